"""Draws the figures of docs/ and records the numbers the pages quote, from real runs on the embedded data.

    python scripts/docs_figures.py [--work DIR]   # writes docs/figures/*.png and docs/figures/results.json

Every figure comes from the `keras-clip-it` commands, run in-process (the code users run), with ASIF
(EfficientNet-Lite0 + multilingual-e5-small for Italian, all-MiniLM-L6-v2 for English) over the emoji
*training* pairs only: the test emoji shown and measured were never anchors. Offline and deterministic.
Most of the time goes into embedding the 1,481 training emoji once; with --work DIR the embedded
collections are kept there and reused by the next run.
"""

import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = os.path.join(ROOT, "docs", "figures")
# Held-out (test split) emoji whose Italian names make a readable 12-way confusion matrix.
CLASSES_IT = ["mucca", "scimmia", "delfino", "leone", "pappagallo", "limone",
              "mela rossa", "melanzana", "spaghetti", "violino", "teiera", "pupazzo di neve"]
QUERIES_IT = ["un leone", "una mucca", "un violino", "la bandiera dell'Italia", "un cuore verde"]
SCENE_IT = ["leone", "teiera", "violino", "pupazzo di neve"]  # 2x2 tiles; the map looks for the first
PHOTOS = {"chelsea.png": "un gatto", "coffee.png": "una tazza di caffè", "astronaut.png": "un astronauta",
          "rocket.jpg": "un razzo", "motorcycle_left.png": "una moto"}
ANCHORS = "100,250,500,1000"
EVALUATED = "100"  # held-out emoji evaluated (a seeded random subset of the 393)
GALLERY = 60  # held-out emoji in the retrieval gallery: the queries' targets and the first others
LARGEST_PNG = 190_000  # bytes; larger figures are re-saved with a 256-colour palette


def command(*argv):
    """Runs one `keras-clip-it` command in-process and returns its JSON results."""
    from keras_clip_it import cli

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        output = handle.name
    print("\n$ keras-clip-it " + " ".join(argv), flush=True)
    if cli.main([*argv, "--output", output]) != 0:
        sys.exit(f"keras-clip-it {argv[0]} failed")
    with open(output, encoding="utf-8") as handle:
        result = json.load(handle)
    os.remove(output)
    return result


def keep(result, name):
    """Moves the single figure of a command result to docs/figures/<name> and returns its path."""
    (path,) = result["figures"]
    target = os.path.join(FIGURES, name)
    shutil.move(path, target)
    if os.path.getsize(target) > LARGEST_PNG:
        Image.open(target).convert("RGB").quantize(256).save(target, optimize=True)
    return target


def train_collections(folder):
    """The emoji training pairs as stored collections "it" and "en", images embedded once for both."""
    import keras_clip_it as kci
    from keras_clip_it.collections.analogy_collection import AnalogyCollection
    from keras_clip_it.tasks import commands

    paths = {lang: os.path.join(folder, f"emoji-{lang}-train") for lang in ("it", "en")}
    if all(os.path.exists(path) for path in paths.values()):
        return paths
    ids, images, captions_it = kci.datasets.emoji_pairs("it", split="train", return_ids=True)
    _, captions_en = kci.datasets.emoji_pairs("en", split="train")
    image_encoder = commands._encoder("image", commands.IMAGE_PRESET)
    image_embeddings = image_encoder.embed(images, progress=True)
    for lang, captions in (("it", captions_it), ("en", captions_en)):
        text_encoder = commands._encoder("text", commands.TEXT_PRESETS[lang])
        collection = AnalogyCollection(name=f"emoji-{lang}-train", language=lang)
        collection.add(ids, captions=captions, embeddings={
            "image": {image_encoder.fingerprint: image_embeddings},
            "text": {text_encoder.fingerprint: text_encoder.embed(captions, progress=True)},
        })
        collection.save(paths[lang])
    return paths


def test_emoji_files(folder):
    """Held-out emoji as PNG files named by id: the classes, the scene, the retrieval targets and the
    first others up to GALLERY in `folder`/gallery; returns {Italian name: path}, {Italian: English}."""
    import keras_clip_it as kci

    ids, images, captions_it = kci.datasets.emoji_pairs("it", split="test", return_ids=True)
    _, captions_en = kci.datasets.emoji_pairs("en", split="test")
    targets = {"leone", "mucca", "violino", "bandiera italia", "cuore verde"}
    gallery = targets | set(captions_it[: GALLERY - len(targets)])
    os.makedirs(os.path.join(folder, "gallery"), exist_ok=True)
    by_name, english = {}, {}
    for pair_id, image, it, en in zip(ids, images, captions_it, captions_en):
        if it in gallery:
            path = os.path.join(folder, "gallery", f"{pair_id}.png")
        elif it in CLASSES_IT or it in SCENE_IT:
            path = os.path.join(folder, f"{pair_id}.png")
        else:
            continue
        Image.fromarray(image).save(path)
        by_name[it], english[it] = path, en
    return by_name, english


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder kept between runs for the embedded collections (default: temporary)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.makedirs(FIGURES, exist_ok=True)
    started = time.perf_counter()
    work = args.work or tempfile.mkdtemp(prefix="kci-docs-")
    os.makedirs(work, exist_ok=True)
    collections = train_collections(work)
    emoji, english = test_emoji_files(os.path.join(work, "test"))
    figures_tmp = os.path.join(work, "figures")
    it = ["--lang", "it", "--collection", collections["it"], "--figures", figures_tmp]
    en = ["--lang", "en", "--collection", collections["en"], "--figures", figures_tmp]
    results_path = os.path.join(FIGURES, "results.json")
    results = {}
    if args.work and os.path.exists(results_path):  # an interrupted run: keep its finished stages
        with open(results_path, encoding="utf-8") as handle:
            results = json.load(handle)
    examples = results.setdefault("examples", {})

    def stage(name):
        """Writes what is done and says whether stage `name` still has to run, so a run stopped on a
        shared machine (out of memory) resumes where it stopped with the same --work."""
        with open(results_path, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        return name not in results

    import skimage

    def short(result):
        text = json.dumps(result, ensure_ascii=False).replace(os.path.join(work, "test", "gallery") + os.sep, "emoji/")
        return json.loads(text.replace(skimage.data.data_dir + os.sep, "photos/").replace(work + os.sep, ""))

    def evaluation(result):
        kept = {key: result[key] for key in ("dataset", "images", "templates", "metrics", "model") if key in result}
        return dict(kept, chance_top1=result.get("chance_top1"), anchors_curve=result.get("anchors_curve"))

    if stage("evaluate_emoji_it"):
        evaluate_it = command("evaluate", "--limit", EVALUATED, "--anchors", ANCHORS, *it)
        keep(evaluate_it, "accuracy_vs_anchors_emoji_it.png")
        results["evaluate_emoji_it"] = evaluation(evaluate_it)
    if stage("zero_shot_12_emoji"):
        files = [emoji[name] for name in CLASSES_IT]
        classify_it = command("classify", *files, "--labels", *CLASSES_IT, "--truth", *CLASSES_IT, *it)
        keep(classify_it, "zero_shot_emoji_it_confusion.png")
        names_en = [english[name] for name in CLASSES_IT]
        classify_en = command("classify", *files, "--labels", *names_en, "--truth", *names_en, *en)
        os.remove(classify_en["figures"][0])
        results["zero_shot_12_emoji"] = {
            "it": {"top1": classify_it["accuracy_top1"], "top3": classify_it["accuracy_top3"]},
            "en": {"top1": classify_en["accuracy_top1"], "top3": classify_en["accuracy_top3"]},
            "classes": len(CLASSES_IT),
        }

    photos = [os.path.join(skimage.data.data_dir, name) for name in PHOTOS]
    if stage("zero_shot_photos_it"):
        labels = list(PHOTOS.values())
        classify_photos = command("classify", *photos, "--labels", *labels, "--truth", *labels, *it)
        os.remove(classify_photos["figures"][0])
        examples["classify"] = short(classify_photos)
        results["zero_shot_photos_it"] = {
            "top1": classify_photos["accuracy_top1"],
            "predictions": {os.path.basename(p["image"]): p["label"] for p in classify_photos["predictions"]},
        }

    if stage("retrieval_it"):
        gallery = os.path.join(work, "test", "gallery")
        retrieve_it = command("retrieve", "--texts", *QUERIES_IT, "--images", gallery, *it)
        keep(retrieve_it, "retrieval_emoji_it.png")
        path_names = {path: name for name, path in emoji.items()}
        examples["retrieve"] = short(dict(retrieve_it, results=retrieve_it["results"][:1]))
        results["retrieval_gallery_size"] = retrieve_it["gallery_size"]
        results["retrieval_it"] = {r["query"]: [path_names[m["item"]] for m in r["matches"]] for r in retrieve_it["results"]}

    if stage("localization"):
        tiles = [np.asarray(Image.open(emoji[name])) for name in SCENE_IT]
        scene = np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)
        scene_path = os.path.join(work, "scene.png")
        Image.fromarray(scene).save(scene_path)
        localize_scene = command("localize", scene_path, "--texts", SCENE_IT[0], "--patch-fraction", "0.5",
                                 "--grid", "2", *it)
        keep(localize_scene, "localization_emoji_scene_it.png")
        localize_cat = command("localize", photos[0], "--texts", PHOTOS["chelsea.png"], *it)
        keep(localize_cat, "localization_chelsea_it.png")
        examples["localize"] = short(localize_scene)
        results["localization"] = {
            "scene_tiles": SCENE_IT,
            "scene_quadrant_means": localize_scene["maps"][0]["grid"],
            "chelsea_peak": localize_cat["maps"][0]["peak"],
            "chelsea_shape": localize_cat["maps"][0]["shape"],
        }

    if stage("evaluate_fashion_mnist_it_100"):
        fashion = command("evaluate", "--dataset", "fashion-mnist", "--limit", "100", *it)
        keep(fashion, "zero_shot_fashion_mnist_it_confusion.png")
        results["evaluate_fashion_mnist_it_100"] = evaluation(fashion)
    if stage("evaluate_emoji_en"):
        results["evaluate_emoji_en"] = evaluation(command("evaluate", "--limit", EVALUATED, *en))

    results["seconds"] = round(time.perf_counter() - started)
    results["figures_bytes"] = {name: os.path.getsize(os.path.join(FIGURES, name))
                                for name in sorted(os.listdir(FIGURES)) if name.endswith(".png")}
    stage("written")
    if not args.work:
        shutil.rmtree(work)
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
