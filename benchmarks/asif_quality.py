"""ASIF quality with the old and the new defaults: centring and label pooling, English and Italian.

Two measurements, on the cached embeddings of recipes/asif_emoji.py and recipes/asif_fashion.py (computed
and cached on first use, as those recipes do):

  emoji     the 1,481 training emoji pairs are the collection; each of the 393 held-out images must find its
            own caption among the 393 held-out captions (image -> caption R@1, R@5, R@10), as in
            recipes/asif_emoji.py. Label pooling plays no part (no labels).
  fashion   the first N Fashion-MNIST training images, each captioned by its class name in a random template
            of the language's full set, are the collection; the 10,000 test images are classified among the
            ten class names with the 7 short templates (top-1 accuracy), as in recipes/asif_fashion.py.

Each is run with every variant: the old defaults (no centring, templates averaged then represented),
centring only, the pooling change only (each caption represented, a label scored by its best caption:
"max", or by their mean: "mean"), and both; at the model's defaults for k and p and at k = 10, p = 16.
Results go to benchmarks/results/asif_quality.json and asif_quality.md.

    python benchmarks/asif_quality.py                       # 1k, 3k, 10k anchors (about 10 minutes once cached)
    python benchmarks/asif_quality.py --anchors 1000 3000 10000 60000
"""

import argparse
import hashlib
import inspect
import json
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "recipes"))

import numpy as np  # noqa: E402

import harness  # noqa: E402
import keras_clip_it as kci  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
TEXT_PRESETS = {"en": "all_minilm_l6_v2", "it": "multilingual_e5_small"}
LABEL_TEMPLATES = {"en": "en-short", "it": "it-short"}
# (name, center, label_pooling)
VARIANTS = (
    ("old defaults", False, "average"),
    ("centering only", True, "average"),
    ("pooling max", False, "max"),
    ("pooling mean", False, "mean"),
    ("centering + max", True, "max"),
    ("centering + mean", True, "mean"),
)


def emoji(image_embeddings, lang, settings):
    """Held-out image -> caption recall for each (k, p) and centring."""
    import asif_emoji

    ids, _, captions = kci.datasets.emoji_pairs(lang=lang, split="all", return_ids=True)
    train_ids = set(kci.datasets.emoji_pairs(lang=lang, split="train", return_ids=True)[0])
    text_encoder = kci.TextEncoder.from_preset(TEXT_PRESETS[lang])
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:12]
    texts = asif_emoji.cached_embeddings(text_encoder, captions, f"text_{lang}_{digest}")
    train = np.array([i for i, name in enumerate(ids) if name in train_ids])
    test = np.array([i for i, name in enumerate(ids) if name not in train_ids])
    rows = []
    for k, p in settings:
        for center in (False, True):
            asif = kci.ASIF(_IMAGE_ENCODERS["emoji"], text_encoder, k=min(k, len(train)), p=p, center=center)
            asif.add([ids[i] for i in train], image_embeddings=image_embeddings[train], text_embeddings=texts[train])
            recall = asif_emoji.image_to_text_recall(asif, image_embeddings[test], texts[test])
            rows.append({"data": "emoji", "lang": lang, "anchors": len(train), "queries": len(test), "k": k, "p": p,
                         "center": center, **recall})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def fashion(train_embeddings, test_embeddings, lang, anchors, settings):
    """Zero-shot accuracy for each collection size, (k, p) and variant."""
    import asif_fashion
    from keras_clip_it.templates import get_templates

    text_encoder = kci.TextEncoder.from_preset(TEXT_PRESETS[lang])
    (_, train_labels), class_names = kci.datasets.fashion_mnist("train", lang=lang)
    (_, test_labels), _ = kci.datasets.fashion_mnist("test")
    table = asif_fashion.caption_table(text_encoder, class_names, lang)
    templates = get_templates(lang)
    rows = []
    for count in anchors:
        labels = train_labels[:count]
        choice = np.random.default_rng(1).integers(0, table.shape[0], count)
        for k, p in settings:
            for center in (False, True):
                asif = kci.ASIF(_IMAGE_ENCODERS["fashion"], text_encoder, k=k, p=p, center=center)
                asif.add([f"train-{i}" for i in range(count)], image_embeddings=train_embeddings[:count],
                         text_embeddings=table[choice, labels],
                         captions=[templates[t].format(class_names[c]) for t, c in zip(choice, labels)])
                start = time.perf_counter()
                queries = asif.encode_images(embeddings=test_embeddings)
                for name, variant_center, pooling in VARIANTS:
                    if variant_center != center:
                        continue
                    scores = asif.class_scores(queries, class_names, LABEL_TEMPLATES[lang], pooling=pooling)
                    rows.append({"data": "fashion", "lang": lang, "anchors": int(count), "k": k, "p": p,
                                 "variant": name, "center": center, "label_pooling": pooling,
                                 "accuracy": float(np.mean(scores.argmax(axis=1) == test_labels))})
                    print(json.dumps(rows[-1]), flush=True)
                rows[-1]["seconds"] = time.perf_counter() - start
    return rows


_IMAGE_ENCODERS = {}


def markdown(results):
    defaults = results["model_defaults"]
    lines = ["Emoji held-out image -> caption (1,481 anchors, 393 queries): R@1 / R@5 / R@10", "",
             "| language | k, p | no centring | centring |", "|---|---|---|---|"]
    emoji_rows = [r for r in results["runs"] if r["data"] == "emoji"]
    for lang in TEXT_PRESETS:
        for k, p in sorted({(r["k"], r["p"]) for r in emoji_rows}, reverse=True):
            cells = {r["center"]: r for r in emoji_rows if (r["lang"], r["k"], r["p"]) == (lang, k, p)}
            if cells:
                lines.append(f"| {lang} | {k}, {p:g} | " + " | ".join(
                    f"{cells[c]['R@1']:.3f} / {cells[c]['R@5']:.3f} / {cells[c]['R@10']:.3f}" for c in (False, True)) + " |")
    lines += ["", "Fashion-MNIST zero-shot top-1 accuracy (10,000 test images, 7 short templates per label)", "",
              "| language | anchors | k, p | " + " | ".join(name for name, _, _ in VARIANTS) + " |",
              "|---|---:|---|" + "---:|" * len(VARIANTS)]
    fashion_rows = [r for r in results["runs"] if r["data"] == "fashion"]
    for lang in TEXT_PRESETS:
        for count in sorted({r["anchors"] for r in fashion_rows}):
            for k, p in sorted({(r["k"], r["p"]) for r in fashion_rows}, reverse=True):
                cells = {r["variant"]: r["accuracy"] for r in fashion_rows
                         if (r["lang"], r["anchors"], r["k"], r["p"]) == (lang, count, k, p)}
                if cells:
                    lines.append(f"| {lang} | {count:,} | {k}, {p:g} | "
                                 + " | ".join(f"{cells[name]:.3f}" if name in cells else "" for name, _, _ in VARIANTS) + " |")
    lines += ["", f"Model defaults: k = {defaults['k']}, p = {defaults['p']:g}, center = {defaults['center']}, "
              f"label_pooling = {defaults['label_pooling']!r}."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchors", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--lang", nargs="+", default=["en", "it"], choices=sorted(TEXT_PRESETS))
    parser.add_argument("--data", nargs="+", default=["emoji", "fashion"], choices=["emoji", "fashion"])
    parser.add_argument("--setting", nargs=2, type=float, action="append", metavar=("K", "P"),
                        help="k, p to run (repeatable; default: the model's defaults and 10, 16)")
    parser.add_argument("--output", default="asif_quality", help="name of the results files")
    args = parser.parse_args()
    import asif_emoji
    import asif_fashion

    signature = inspect.signature(kci.ASIF.__init__).parameters
    defaults = {name: signature[name].default for name in ("k", "p", "center", "label_pooling")}
    settings = [(int(k), float(p)) for k, p in args.setting] if args.setting else \
        sorted({(int(defaults["k"]), float(defaults["p"])), (10, 16.0)}, reverse=True)
    results = {"model_defaults": defaults, "settings": settings, "runs": []}
    if "emoji" in args.data:
        _IMAGE_ENCODERS["emoji"] = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
        _, images, _ = kci.datasets.emoji_pairs(split="all", return_ids=True)
        image_embeddings = asif_emoji.cached_embeddings(_IMAGE_ENCODERS["emoji"], images, f"images_{len(images)}")
        for lang in args.lang:
            results["runs"] += emoji(image_embeddings, lang, settings)
            write(results, args.output)
    if "fashion" in args.data:
        encoder = _IMAGE_ENCODERS["fashion"] = kci.ImageEncoder.from_preset(
            "efficientnet_lite0_imagenet", image_size=(64, 64), crop_pct=1.0)
        test_embeddings = asif_fashion.image_embeddings(encoder, "test")
        train_embeddings = asif_fashion.image_embeddings(encoder, "train", max(args.anchors))
        for lang in args.lang:
            results["runs"] += fashion(train_embeddings, test_embeddings, lang, args.anchors, settings)
            write(results, args.output)


def write(results, name):
    harness.write_results(RESULTS, name, results, markdown(results))


if __name__ == "__main__":
    main()
