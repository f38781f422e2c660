"""Texts per second of the all_minilm_l6_v2 TextEncoder on JAX and TensorFlow against sentence-transformers.

Every measurement runs in its own process, the runners in turn (benchmarks/text_towers.py), on the same
texts and batch size. Each timing is the best of `--repeats` runs after one warm-up run that compiles every
shape. Two workloads: short captions (the 48 short sentences of the parity fixture, English and Italian,
repeated) and long texts truncated to the model's 256 tokens.

Writes benchmarks/results/minilm.json and benchmarks/results/minilm.md (or in --results-dir).

Usage: python benchmarks/minilm.py [--batch-size 64] [--repeats 3] [--rounds 1]
"""

import json
import os

import harness
import text_towers

FIXTURE = os.path.join(harness.ROOT, "tests", "encoders", "data", "sentences_en_it.json")
RUNNERS = ("sentence-transformers (torch)", "keras_clip_it (jax)", "keras_clip_it (tensorflow)")


def workloads():
    with open(FIXTURE, encoding="utf-8") as handle:
        sentences = json.load(handle)
    texts = sentences["en"] + sentences["it"]
    short = [text for text in texts if len(text) < 300]
    long = [text for text in texts if len(text) >= 300]
    return {"short captions": short * 10, "long texts (256 tokens)": long * 32}


def measure(runner, args):
    """Runs in a child process: texts/s of one runner on every workload, and its peak memory."""
    batch_size = args.batch_size
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

    rows = text_towers.throughput(embed, workloads(), args.repeats, tokenize)
    return {"workloads": rows, "peak_rss_mb": harness.peak_rss_mb()}


def table(results, args):
    batch_size = args.batch_size
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


if __name__ == "__main__":
    text_towers.main(__file__, __doc__, "minilm", lambda args: RUNNERS, measure, table)
