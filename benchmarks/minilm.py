"""Texts per second of the all_minilm_l6_v2 TextEncoder on JAX and TensorFlow against sentence-transformers.

Every measurement runs in its own process (the Keras backend is fixed at import, and torch, JAX and
TensorFlow each size their thread pools for the whole machine), one after the other in the same run, on the
same texts and batch size. Each timing is the best of `--repeats` runs after one warm-up run that
compiles every shape. Two workloads: short captions (the 48 short sentences of the parity fixture, English
and Italian, repeated) and long texts truncated to the model's 256 tokens.

Writes benchmarks/results/minilm.json and benchmarks/results/minilm.md.

Usage: python benchmarks/minilm.py [--batch-size 64] [--repeats 3]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "tests", "encoders", "data", "sentences_en_it.json")
RUNNERS = ("sentence-transformers (torch)", "keras_clip_it (jax)", "keras_clip_it (tensorflow)")


def workloads():
    with open(FIXTURE, encoding="utf-8") as handle:
        sentences = json.load(handle)
    texts = sentences["en"] + sentences["it"]
    short = [text for text in texts if len(text) < 300]
    long = [text for text in texts if len(text) >= 300]
    return {"short captions": short * 10, "long texts (256 tokens)": long * 32}


def best_time(function, texts, repeats):
    function(texts)  # compiles every batch shape
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(texts)
        times.append(time.perf_counter() - start)
    return min(times)


def measure(runner, batch_size, repeats):
    """Runs in a child process: texts/s of one runner on every workload, and its peak memory."""
    if runner.startswith("sentence-transformers"):
        from sentence_transformers import SentenceTransformer

        from keras_clip_it.encoders.minilm.minilm_converter import minilm_directory

        model = SentenceTransformer(minilm_directory(), device="cpu")

        def embed(texts):
            return model.encode(texts, batch_size=batch_size, normalize_embeddings=True)

        def tokenize(texts):
            return model.tokenizer(texts, truncation=True, max_length=model.max_seq_length, padding=True)

    else:
        import keras_clip_it as kci

        encoder = kci.TextEncoder.from_preset("all_minilm_l6_v2")

        def embed(texts):
            return encoder.embed(texts, batch_size=batch_size, progress=False)

        def tokenize(texts):
            return [encoder.tokenize(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]

    results = {}
    for name, texts in workloads().items():
        results[name] = {
            "texts_per_s": len(texts) / best_time(embed, texts, repeats),
            "tokenize_texts_per_s": len(texts) / best_time(tokenize, texts, repeats),
            "texts": len(texts),
        }
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"workloads": results, "peak_rss_mb": peak_mb}


def run_child(runner, batch_size, repeats):
    backend = runner.split("(")[-1].rstrip(")")
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3")
    env["KERAS_BACKEND"] = backend if backend in ("jax", "tensorflow") else "jax"
    command = [sys.executable, __file__, "--child", runner, "--batch-size", str(batch_size), "--repeats", str(repeats)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def table(results, batch_size):
    reference = results[RUNNERS[0]]["workloads"]
    lines = [
        f"all_minilm_l6_v2, batch size {batch_size}, CPU ({os.cpu_count()} cores); ratio = ours / sentence-transformers",
        "",
        "| runner | workload | texts/s | ratio | tokenize texts/s | peak RSS (MB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for runner in RUNNERS:
        for workload, row in results[runner]["workloads"].items():
            ratio = row["texts_per_s"] / reference[workload]["texts_per_s"]
            lines.append(
                f"| {runner} | {workload} | {row['texts_per_s']:.1f} | {ratio:.2f} | "
                f"{row['tokenize_texts_per_s']:.0f} | {results[runner]['peak_rss_mb']:.0f} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=RUNNERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch_size, args.repeats)))
        return
    results = {runner: run_child(runner, args.batch_size, args.repeats) for runner in RUNNERS}
    markdown = table(results, args.batch_size)
    print(markdown)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "minilm.json"), "w") as handle:
        json.dump({"batch_size": args.batch_size, "repeats": args.repeats, "results": results}, handle, indent=1)
    with open(os.path.join(HERE, "results", "minilm.md"), "w") as handle:
        handle.write(markdown + "\n")


if __name__ == "__main__":
    main()
