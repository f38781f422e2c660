"""ASIF on the embedded emoji pairs: held-out image -> caption retrieval in English and Italian.

The 1,481 training pairs are the analogy collection; each held-out emoji image must find its own caption
among the held-out captions. k and p are chosen on a validation split carved out of the training pairs
(1,181 anchors, 300 validation queries), never on the test pairs; the test numbers then use all 1,481
anchors. "joint" is the (k, p) best on validation averaged over both languages: kci.ASIF's defaults.
English captions go through MiniLM (all-MiniLM-L6-v2), Italian ones through multilingual-e5-small;
images through EfficientNet-Lite0 (ImageNet). Everything is offline.

    python recipes/asif_emoji.py                 # both languages, full sweep
    python recipes/asif_emoji.py --lang it       # one language
    python recipes/asif_emoji.py --quick         # a 3 x 3 sweep

Results are printed as markdown and written to benchmarks/results/asif_emoji.json.
"""

import argparse
import hashlib
import inspect
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import keras_clip_it as kci  # noqa: E402
from keras_clip_it.cache import cache_dir  # noqa: E402

TEXT_PRESETS = {"en": "all_minilm_l6_v2", "it": "multilingual_e5_small"}
KS = (5, 10, 20, 40, 80, 160, 320, 640, 1200)
PS = (1, 2, 4, 8, 16, 32)
VALIDATION = 300
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "results", "asif_emoji.json")


def cached_embeddings(encoder, inputs, key):
    """encoder.embed(inputs), cached as .npy under the package cache (keyed by encoder and inputs)."""
    folder = os.path.join(cache_dir(), "recipes")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"asif_emoji_{encoder.fingerprint[:16]}_{key}.npy")
    if os.path.exists(path):
        return np.load(path, allow_pickle=False)
    embeddings = encoder.embed(inputs)
    np.save(path, embeddings)
    return embeddings


def image_to_text_recall(asif, image_embeddings, text_embeddings):
    """R@1/5/10 of each image finding its own caption (row i of both) among all the captions."""
    similarity = asif.similarity(asif.encode_images(embeddings=image_embeddings), asif.encode_texts(embeddings=text_embeddings))
    ranks = kci.metrics.ranks(similarity, np.arange(len(similarity)))
    return {f"R@{k}": float(np.mean(ranks <= k)) for k in (1, 5, 10)}


def build(image_encoder, text_encoder, ids, image_embeddings, text_embeddings, k, p):
    asif = kci.ASIF(image_encoder, text_encoder, k=k, p=p)
    asif.add(ids, image_embeddings=image_embeddings, text_embeddings=text_embeddings)
    return asif


def run_language(lang, image_encoder, image_embeddings, ks, ps):
    ids, _, captions = kci.datasets.emoji_pairs(lang=lang, split="all", return_ids=True)
    train_ids = set(kci.datasets.emoji_pairs(lang=lang, split="train", return_ids=True)[0])
    text_encoder = kci.TextEncoder.from_preset(TEXT_PRESETS[lang])
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:12]
    start = time.perf_counter()
    text_embeddings = cached_embeddings(text_encoder, captions, f"text_{lang}_{digest}")
    print(f"[{lang}] {len(captions)} captions embedded in {time.perf_counter() - start:.0f}s", flush=True)

    train = np.array([i for i, name in enumerate(ids) if name in train_ids])
    test = np.array([i for i, name in enumerate(ids) if name not in train_ids])
    # Validation: the last VALIDATION training pairs in a fixed hash order, anchors are the rest.
    order = sorted(train, key=lambda i: hashlib.sha256(ids[i].encode()).hexdigest())
    anchors, validation = np.array(order[:-VALIDATION]), np.array(order[-VALIDATION:])

    sweep = []
    for k in ks:
        for p in ps:
            asif = build(image_encoder, text_encoder, [ids[i] for i in anchors], image_embeddings[anchors],
                         text_embeddings[anchors], min(k, len(anchors)), p)
            recall = image_to_text_recall(asif, image_embeddings[validation], text_embeddings[validation])
            sweep.append({"k": k, "p": p, **recall})
    best = max(sweep, key=lambda r: (r["R@1"], r["R@5"], r["R@10"]))
    print(f"[{lang}] validation sweep best: k={best['k']} p={best['p']} R@1={best['R@1']:.3f}", flush=True)

    def test_recall(k, p):
        asif = build(image_encoder, text_encoder, [ids[i] for i in train], image_embeddings[train],
                     text_embeddings[train], min(k, len(train)), p)
        return image_to_text_recall(asif, image_embeddings[test], text_embeddings[test])

    result = {
        "text_encoder": TEXT_PRESETS[lang],
        "anchors": int(len(train)),
        "test_queries": int(len(test)),
        "validation": {"anchors": int(len(anchors)), "queries": int(len(validation)), "sweep": sweep},
        "best": {"k": best["k"], "p": best["p"], "test": test_recall(best["k"], best["p"])},
        "paper": {"k": 800, "p": 8, "test": test_recall(800, 8)},
    }
    return result, test_recall


def joint_best(results):
    """The (k, p) with the best validation R@1 averaged over the languages: the model's defaults."""
    scores = {}
    for r in results.values():
        for row in r["validation"]["sweep"]:
            scores.setdefault((row["k"], row["p"]), []).append(row["R@1"])
    return max(scores, key=lambda key: np.mean(scores[key]))


def markdown(results):
    lines = ["| language | text encoder | k | p | R@1 | R@5 | R@10 |", "|---|---|---|---|---|---|---|"]
    for lang, r in results["languages"].items():
        for name in ("best", "joint", "paper"):
            t = r[name]["test"]
            lines.append(
                f"| {lang} ({name}) | {r['text_encoder']} | {r[name]['k']} | {r[name]['p']:g} "
                f"| {t['R@1']:.3f} | {t['R@5']:.3f} | {t['R@10']:.3f} |"
            )
    for lang, r in results["languages"].items():
        ps = sorted({row["p"] for row in r["validation"]["sweep"]})
        lines += ["", f"Validation R@1, {lang} ({r['validation']['anchors']} anchors, {r['validation']['queries']} "
                  "queries): rows k, columns p", "", "| k | " + " | ".join(f"p={p:g}" for p in ps) + " |",
                  "|---|" + "---|" * len(ps)]
        for k in sorted({row["k"] for row in r["validation"]["sweep"]}):
            cells = {row["p"]: row["R@1"] for row in r["validation"]["sweep"] if row["k"] == k}
            lines.append(f"| {k} | " + " | ".join(f"{cells[p]:.3f}" for p in ps) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lang", nargs="+", default=["en", "it"], choices=sorted(TEXT_PRESETS))
    parser.add_argument("--quick", action="store_true", help="a 3 x 3 sweep")
    args = parser.parse_args()
    ks, ps = ((10, 40, 160), (1, 4, 16)) if args.quick else (KS, PS)
    image_encoder = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
    _, images, _ = kci.datasets.emoji_pairs(split="all", return_ids=True)
    start = time.perf_counter()
    image_embeddings = cached_embeddings(image_encoder, images, f"images_{len(images)}")
    print(f"{len(images)} images embedded in {time.perf_counter() - start:.0f}s", flush=True)
    runs = {lang: run_language(lang, image_encoder, image_embeddings, ks, ps) for lang in args.lang}
    results = {"languages": {lang: result for lang, (result, _) in runs.items()}}
    k, p = joint_best(results["languages"])
    signature = inspect.signature(kci.ASIF.__init__).parameters
    results["joint_best"] = {"k": k, "p": p, "model_defaults": {n: signature[n].default for n in ("k", "p")}}
    for lang, (result, test_recall) in runs.items():
        result["joint"] = {"k": k, "p": p, "test": test_recall(k, p)}
    table = markdown(results)
    print(table)
    if not args.quick:
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
