"""`keras-clip-it evaluate | classify | retrieve | localize`: the tasks from the command line.

Each command loads a model (a saved `.keras` DualEncoder or ASIF, or by default ASIF over the embedded
emoji collection with the offline encoders for --lang), runs one task on image files and texts, prints
the results as JSON (or writes them to --output) and draws PNG figures into --figures. Progress bars go
to stderr, so stdout stays valid JSON.
"""

import functools
import glob
import json
import os
import re
import sys
import time

import numpy as np

from keras_clip_it.tasks.common import IMAGE_SUFFIXES
from keras_clip_it.tasks.common import similarity

IMAGE_PRESET = "efficientnet_lite0_imagenet"
TEXT_PRESETS = {"it": "multilingual_e5_small", "en": "all_minilm_l6_v2"}
DATASETS = ("emoji", "fashion-mnist")
# A confusion matrix stays readable up to this many classes.
MAX_CONFUSION_CLASSES = 40
# Queries drawn in a retrieval grid: more rows make the figure unreadable.
MAX_GRID_QUERIES = 8
CURVE_METRICS = ("zero_shot_top1", "image_to_text_R@1", "text_to_image_R@1")


class CommandError(ValueError):
    """Bad command-line input; the message says what was wrong and what to do."""


def _tqdm(*args, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(*args, **kwargs)


def _clean_errors(command, run):
    """Bad input ends the command with its message on stderr and exit status 1, not a traceback."""

    def wrapped(args):
        try:
            return run(args)
        except (ValueError, LookupError, OSError, ImportError) as error:
            # KeyError's str() is the repr of its message; show the message itself.
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            print(f"keras-clip-it {command}: error: {message}", file=sys.stderr)
            return 1

    return wrapped


# === Models ===


@functools.lru_cache(maxsize=None)
def _encoder(kind, preset):
    """Encoders are frozen: one instance per preset serves every command run in a process."""
    import keras_clip_it as kci

    return (kci.ImageEncoder if kind == "image" else kci.TextEncoder).from_preset(preset)


def _load_keras(path):
    from keras_clip_it.models.asif import ASIF
    from keras_clip_it.models.dual_encoder import DualEncoder
    from keras_clip_it.models.saved import SavedModelError
    from keras_clip_it.models.saved import load_saved

    try:
        return load_saved(path, kinds=(DualEncoder, ASIF))
    except SavedModelError as error:
        raise CommandError(f"--model: {error}") from None


def load_model(args):
    """The model of --model, or ASIF over --collection with the offline encoders for --lang.

    Returns:
        (model, description): the model and a JSON-ready dict saying what it is.
    """
    import keras_clip_it as kci

    if args.model:
        with _tqdm(total=1, desc=f"loading {os.path.basename(args.model)}", unit="model") as bar:
            model = _load_keras(args.model)
            bar.update()
        if args.collection and not isinstance(model, kci.ASIF):
            raise CommandError(f"--collection is for ASIF models, but {args.model!r} holds a {type(model).__name__}")
        if args.collection:
            model.use(args.collection)
        description = {"family": type(model).__name__, "model": args.model}
    else:
        text_preset = TEXT_PRESETS[args.lang]
        with _tqdm(total=2, desc="loading the encoders", unit="encoder") as bar:
            image_encoder = _encoder("image", IMAGE_PRESET)
            bar.update()
            text_encoder = _encoder("text", text_preset)
            bar.update()
        collection = args.collection or f"emoji-{args.lang}"
        model = kci.ASIF(image_encoder, text_encoder)
        model.use(collection)  # embeds the pairs (with the encoders' own progress bars) when not stored embedded
        description = {"family": "ASIF", "image_encoder": IMAGE_PRESET, "text_encoder": text_preset}
    if isinstance(model, kci.ASIF):
        description.update(collection=model.collection.name, anchors=len(model.collection), k=model.k, p=model.p)
    else:
        description.update(projection_dim=model.projection_dim)
    return model, description


def _is_asif(model):
    import keras_clip_it as kci

    return isinstance(model, kci.ASIF)


def _chunked(encode, items, batch_size, description):
    """Runs `encode` over `items` a batch at a time, with a progress bar when there are several batches."""
    starts = range(0, len(items), batch_size)
    bar = _tqdm(starts, desc=description, unit="batch", disable=len(starts) < 2)
    return np.concatenate([np.asarray(encode(items[start : start + batch_size]), np.float32) for start in bar])


def embed(model, kind, items, batch_size):
    """Dense rows for `items`: a DualEncoder's projections, or the embeddings ASIF represents against anchors.

    Kept apart from the representation so ASIF can re-represent the same embeddings against other
    anchors (the accuracy-vs-anchors curve) without running the encoders again.
    """
    if _is_asif(model):
        encoder = model.image_encoder if kind == "image" else model.text_encoder
        encode = encoder.embed
    else:
        encode = model.encode_images if kind == "image" else model.encode_texts
    return _chunked(functools.partial(encode, batch_size=batch_size), items, batch_size, f"encoding {len(items)} {kind}s")


def represent(model, kind, embeddings):
    """What the model compares: ASIF's relative representations of the embeddings, or the embeddings."""
    if not _is_asif(model):
        return embeddings
    return model.encode_images(embeddings=embeddings) if kind == "image" else model.encode_texts(embeddings=embeddings)


# === Inputs ===


def expand_images(patterns):
    """Image files from paths, folders, globs and fsspec URIs (globs in URIs too), in a stable order."""
    items = []
    for pattern in patterns:
        if "://" in pattern:
            items += _expand_uri(pattern)
        elif glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
            if not matches:
                raise CommandError(f"no file matches {pattern!r}: check the pattern")
            items += matches
        elif os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, n) for n in os.listdir(pattern) if n.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise CommandError(f"folder {pattern!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            items += found
        elif os.path.isfile(pattern):
            items.append(pattern)
        else:
            raise CommandError(f"image {pattern!r} does not exist: check the path")
    if not items:
        raise CommandError("no images given: pass image paths, folders, globs or URIs")
    return items


def _expand_uri(uri):
    import fsspec

    filesystem, path = fsspec.core.url_to_fs(uri)
    if not glob.has_magic(path):
        return [uri]
    matches = sorted(filesystem.glob(path))
    if not matches:
        raise CommandError(f"no file matches {uri!r}: check the pattern")
    return [filesystem.unstrip_protocol(match) for match in matches]


def _unique(values, option):
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise CommandError(f"{option} repeats {repeated}: give each once")
    return list(values)


def _templates(args):
    from keras_clip_it.templates import get_templates

    name = args.templates or f"{args.lang}-short"
    templates = None if name == "none" else name
    get_templates(templates)  # a bad template fails now, before the model loads
    return name, templates


def _limit(count, limit):
    """Row positions of a seeded random subset of `limit` items (all of them when None)."""
    if limit is None or limit >= count:
        return np.arange(count)
    if limit < 1:
        raise CommandError(f"--limit must be a positive integer, got {limit}")
    return np.sort(np.random.RandomState(0).choice(count, limit, replace=False))


def load_dataset(args):
    """The evaluation data: {"name", "ids", "images", "captions", "labels", "truth"} (None where absent)."""
    import keras_clip_it as kci

    if args.pairs:
        return _read_pairs(args.pairs, args.limit)
    if args.dataset == "emoji":
        ids, images, captions = kci.datasets.emoji_pairs(args.lang, split=args.split, return_ids=True)
        rows = _limit(len(ids), args.limit)
        captions = [captions[i] for i in rows]
        return {
            "name": f"emoji-{args.lang}:{args.split}",
            "ids": [ids[i] for i in rows],
            "images": images[rows],
            "captions": captions,
            "labels": captions,  # zero-shot among the names of the evaluated emoji
            "truth": np.arange(len(rows)),
        }
    (x, y), class_names = kci.datasets.fashion_mnist(args.split, lang=args.lang)
    rows = _limit(len(x), args.limit)
    return {
        "name": f"fashion-mnist-{args.lang}:{args.split}",
        "ids": None,
        "images": x[rows][..., None],
        "captions": None,
        "labels": class_names,
        "truth": y[rows],
    }


def _read_pairs(path, limit):
    """Evaluation pairs from JSON lines {"image", "caption"} and/or {"image", "label"}, optional "id"."""
    folder = os.path.dirname(os.path.abspath(path))
    rows = []
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [(number, line) for number, line in enumerate(handle, start=1) if line.strip()]
    except FileNotFoundError:
        raise CommandError(f"--pairs {path!r} does not exist: check the path") from None
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise CommandError(f"{path}, line {number}: not a JSON object ({error})") from None
        if not isinstance(row, dict) or "image" not in row or not ({"caption", "label"} & set(row)):
            raise CommandError(f'{path}, line {number}: expected {{"image": ..., "caption": ... and/or "label": ...}}')
        rows.append(row)
    if not rows:
        raise CommandError(f"--pairs {path!r} is empty")
    for field in ("caption", "label"):
        present = sum(field in row for row in rows)
        if 0 < present < len(rows):
            raise CommandError(f"{path}: {present} of {len(rows)} lines have a {field!r}: give it on every line or none")
    rows = [rows[i] for i in _limit(len(rows), limit)]
    images = [row["image"] if "://" in row["image"] else os.path.join(folder, row["image"]) for row in rows]
    labels = list(dict.fromkeys(str(row["label"]) for row in rows)) if "label" in rows[0] else None
    return {
        "name": os.path.basename(path),
        "ids": [str(row["id"]) for row in rows] if all("id" in row for row in rows) else None,
        "images": images,
        "captions": [str(row["caption"]) for row in rows] if "caption" in rows[0] else None,
        "labels": labels,
        "truth": np.array([labels.index(str(row["label"])) for row in rows]) if labels else None,
    }


def _parse_anchors(text):
    if not text:
        return []
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise CommandError(f"--anchors {text!r} must be comma-separated integers, e.g. 100,500,1500") from None
    if not counts or counts[0] < 1:
        raise CommandError(f"--anchors {text!r} must be positive integers, e.g. 100,500,1500")
    return counts


# === Outputs ===


def emit(result, args):
    """Prints the JSON results, or writes them to --output."""
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if args.output:
        folder = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(folder, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        print(f"results written to {args.output}", file=sys.stderr)
    else:
        print(text)


def save_figure(figure, folder, name):
    """Writes a matplotlib figure as a PNG in `folder` and returns its path."""
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(figure)
    return path


def slug(text, limit=40):
    """A file-name-safe version of `text` ("un gatto" -> "un-gatto")."""
    return re.sub(r"[^\w]+", "-", text.lower(), flags=re.UNICODE).strip("-")[:limit] or "text"


def anchors_figure(curve, title):
    """Accuracy against the number of anchors in the collection, one line per metric."""
    from keras_clip_it.tasks.plot import _pyplot

    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(5.5, 3.6))
    counts = [point["anchors"] for point in curve]
    for metric in CURVE_METRICS:
        if metric in curve[0]:
            ax.plot(counts, [point[metric] for point in curve], marker="o", label=metric)
    ax.set_xscale("log")
    ax.set_xlabel("anchors (pairs in the collection)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure


def _rounded(values, digits=4):
    return [round(float(value), digits) for value in values]


# === Commands ===


def run_classify(args):
    import keras_clip_it as kci

    start = time.perf_counter()
    images = expand_images(args.images)
    labels = _unique(args.labels, "--labels")
    template_name, templates = _templates(args)
    if args.truth is not None:
        if len(args.truth) != len(images):
            raise CommandError(f"--truth has {len(args.truth)} labels for {len(images)} images: give one per image, in order")
        unknown = sorted(set(args.truth) - set(labels))
        if unknown:
            raise CommandError(f"--truth names {unknown}, which are not among --labels")
    model, description = load_model(args)
    classifier = kci.ZeroShotClassifier(model, labels, templates=templates, aggregate=args.aggregate)
    scores = _chunked(classifier.scores, images, args.batch_size, f"classifying {len(images)} images")
    order = np.argsort(-scores, axis=1, kind="stable")[:, : args.top_k]
    predictions = [
        {
            "image": image,
            "label": labels[best[0]],
            "score": round(float(row[best[0]]), 4),
            "top": [{"label": labels[j], "score": round(float(row[j]), 4)} for j in best],
        }
        for image, row, best in zip(images, scores, order)
    ]
    result = {
        "command": "classify",
        "model": description,
        "labels": labels,
        "templates": template_name,
        "aggregate": args.aggregate,
        "predictions": predictions,
    }
    figures = []
    if args.truth is not None:
        truth = np.array([labels.index(label) for label in args.truth])
        result["accuracy_top1"] = float(np.mean(order[:, 0] == truth))
        result[f"accuracy_top{order.shape[1]}"] = float(np.mean((order == truth[:, None]).any(axis=1)))
        if args.figures:
            figure = kci.plot.confusion_matrix(truth, order[:, 0], labels, title=f"top-1 {result['accuracy_top1']:.2f}")
            figures.append(save_figure(figure, args.figures, "confusion_matrix.png"))
    elif args.figures:
        shown = predictions[: MAX_GRID_QUERIES * 5]
        captions = [f"{p['label']}\n{p['score']:.3f}" for p in shown]
        figure = kci.plot.image_grid([p["image"] for p in shown], captions, columns=min(5, len(shown)))
        figures.append(save_figure(figure, args.figures, "predictions.png"))
    result["figures"] = figures
    result["seconds"] = round(time.perf_counter() - start, 1)
    emit(result, args)
    return 0


def run_retrieve(args):
    import keras_clip_it as kci

    start = time.perf_counter()
    images = expand_images(args.images)
    texts = list(args.texts)
    text_to_image = args.direction == "text-to-image"
    queries, gallery = (texts, images) if text_to_image else (images, texts)
    model, description = load_model(args)
    found = kci.retrieve(model, queries, gallery, top_k=args.top_k, chunk_size=args.batch_size, backend=args.backend)
    results = [
        {
            "query": query,
            "matches": [
                {"rank": rank, "index": index, "item": gallery[index], "score": round(score, 4)}
                for rank, (index, score) in enumerate(found[q], start=1)
            ],
        }
        for q, query in enumerate(queries)
    ]
    result = {
        "command": "retrieve",
        "model": description,
        "direction": args.direction,
        "backend": args.backend,
        "gallery_size": len(gallery),
        "results": results,
        "figures": [],
    }
    if args.figures:
        shown = results[:MAX_GRID_QUERIES]
        if text_to_image:
            grid = [(m["item"], f"{r['query']}\n#{m['rank']}  {m['score']:.3f}") for r in shown for m in r["matches"]]
            columns = found.indices.shape[1]
        else:
            grid = [(r["query"], "\n".join(f"{m['item']} {m['score']:.2f}" for m in r["matches"][:3])) for r in shown]
            columns = min(4, len(grid))
        figure = kci.plot.image_grid([item for item, _ in grid], [caption for _, caption in grid], columns=columns)
        result["figures"].append(save_figure(figure, args.figures, "retrieval.png"))
    result["seconds"] = round(time.perf_counter() - start, 1)
    emit(result, args)
    return 0


def _coarse(heatmap, cells):
    """The map averaged over a `cells` x `cells` grid: a small summary of where the text is."""
    rows = np.array_split(heatmap, cells, axis=0)
    return [_rounded([block.mean() for block in np.array_split(row, cells, axis=1)], 5) for row in rows]


def run_localize(args):
    import keras_clip_it as kci

    start = time.perf_counter()
    images = expand_images(args.images)
    if not args.texts or any(not text.strip() for text in args.texts):
        raise CommandError("--texts needs at least one non-empty text, e.g. --texts 'un gatto'")
    model, description = load_model(args)
    jobs = [(i, image, text) for i, image in enumerate(images) for text in args.texts]
    maps, figures = [], []
    for i, image, text in _tqdm(jobs, desc="occlusion maps", unit="map"):
        heatmap = kci.localize(
            model, image, text, patch_fraction=args.patch_fraction, stride_fraction=args.stride_fraction,
            batch_size=args.batch_size,
        )
        y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
        maps.append({
            "image": image,
            "text": text,
            "shape": list(heatmap.shape),
            "peak": {"y": int(y), "x": int(x), "drop": round(float(heatmap[y, x]), 5)},
            "grid": _coarse(heatmap, args.grid),
        })
        if args.figures:
            name = f"localize_{i}_{slug(os.path.splitext(os.path.basename(image))[0])}_{slug(text)}.png"
            figures.append(save_figure(kci.plot.heatmap(image, heatmap, title=text), args.figures, name))
    result = {
        "command": "localize",
        "model": description,
        "patch_fraction": args.patch_fraction,
        "stride_fraction": args.stride_fraction,
        "maps": maps,
        "figures": figures,
        "seconds": round(time.perf_counter() - start, 1),
    }
    emit(result, args)
    return 0


def run_evaluate(args):
    import keras_clip_it as kci
    from keras_clip_it.tasks import metrics

    start = time.perf_counter()
    anchors = _parse_anchors(args.anchors)
    template_name, templates = _templates(args)
    data = load_dataset(args)
    model, description = load_model(args)
    if anchors and not _is_asif(model):
        raise CommandError("--anchors varies the analogy collection of an ASIF model; this model is a DualEncoder")
    result = {"command": "evaluate", "model": description, "dataset": data["name"], "images": len(data["images"])}
    if _is_asif(model) and data["ids"]:
        present = set(model.collection.ids)
        held_out = [i for i in data["ids"] if i in present]
        if held_out:  # an evaluated pair must not be its own anchor
            model.remove(held_out)
            result["held_out_removed_from_collection"] = len(held_out)
            description["anchors"] = len(model.collection)
    if anchors and anchors[-1] > len(model.collection):
        raise CommandError(
            f"--anchors {anchors[-1]} is more than the {len(model.collection)} pairs of collection "
            f"{model.collection.name!r} (after removing the evaluated pairs)"
        )

    image_embeddings = embed(model, "image", data["images"], args.batch_size)
    text_embeddings = None
    if data["captions"] is not None:
        text_embeddings = embed(model, "text", data["captions"], args.batch_size)
    ks = tuple(k for k in (1, 5, 10) if k <= len(data["images"])) or (1,)

    def measure():
        values, scores = {}, None
        image_representations = represent(model, "image", image_embeddings)
        if text_embeddings is not None:
            pair_scores = similarity(model, image_representations, represent(model, "text", text_embeddings))
            values.update(metrics.retrieval_metrics(pair_scores, np.arange(len(data["captions"])), ks))
        if data["labels"] is not None:
            classifier = kci.ZeroShotClassifier(model, data["labels"], templates=templates)
            scores = classifier.scores_of(image_representations)
            best = np.argsort(-scores, axis=1, kind="stable")[:, :5]
            values["zero_shot_top1"] = float(np.mean(best[:, 0] == data["truth"]))
            if len(data["labels"]) > 5:
                values["zero_shot_top5"] = float(np.mean((best == data["truth"][:, None]).any(axis=1)))
        return values, scores

    values, scores = measure()
    result.update(templates=template_name, metrics=values)
    if data["labels"] is not None:
        result["classes"] = len(data["labels"])
        result["chance_top1"] = 1 / len(data["labels"])
    figures = []
    if args.figures and scores is not None:
        if len(data["labels"]) <= MAX_CONFUSION_CLASSES:
            figure = kci.plot.confusion_matrix(
                data["truth"], scores.argmax(axis=1), data["labels"],
                title=f"{data['name']}: zero-shot top-1 {values['zero_shot_top1']:.2f}",
            )
            figures.append(save_figure(figure, args.figures, "confusion_matrix.png"))
        else:
            print(f"confusion matrix skipped: {len(data['labels'])} classes (at most {MAX_CONFUSION_CLASSES} are "
                  "readable; use --limit)", file=sys.stderr)
    if anchors:
        curve = [{"anchors": len(model.collection), **{m: values[m] for m in CURVE_METRICS if m in values}}]
        ids = model.collection.ids
        ranked = [ids[i] for i in np.random.RandomState(0).permutation(len(ids))]  # nested random subsets
        size = len(ids)
        for count in _tqdm(sorted(set(anchors) - {size}, reverse=True), desc="accuracy vs anchors", unit="size"):
            model.remove(ranked[count:size])
            size = count
            point, _ = measure()
            curve.append({"anchors": count, **{m: point[m] for m in CURVE_METRICS if m in point}})
        result["anchors_curve"] = sorted(curve, key=lambda point: point["anchors"])
        if args.figures:
            figure = anchors_figure(result["anchors_curve"], f"{description['family']} on {data['name']}")
            figures.append(save_figure(figure, args.figures, "accuracy_vs_anchors.png"))
    result["figures"] = figures
    result["seconds"] = round(time.perf_counter() - start, 1)
    emit(result, args)
    return 0


# === Parsers ===


def _model_options(parser):
    parser.add_argument("--model", help="a saved DualEncoder or ASIF (.keras path or fsspec URI); default: ASIF "
                        "with EfficientNet-Lite0 and the --lang text encoder over --collection")
    parser.add_argument("--lang", choices=tuple(TEXT_PRESETS), default="it",
                        help="language of the texts: picks the default text encoder, collection and templates")
    parser.add_argument("--collection", help="ASIF's analogy collection: a registered name or a stored URI "
                        "(default emoji-LANG)")
    parser.add_argument("--batch-size", type=_positive, default=32, help="items encoded at once")
    parser.add_argument("--output", help="write the JSON results to this file instead of stdout")
    parser.add_argument("--figures", help="folder for the PNG figures")


def _template_option(parser):
    parser.add_argument("--templates", help="prompt templates: en, en-short, it, it-short, a string with {}, or "
                        "none (labels as they are); default LANG-short")


def _positive(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _fraction(text):
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def register(subparsers):
    evaluate = subparsers.add_parser(
        "evaluate", help="retrieval metrics and zero-shot accuracy on a dataset, accuracy vs number of anchors"
    )
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=DATASETS, default="emoji", help="embedded evaluation data")
    source.add_argument("--pairs", help='a JSON-lines file of {"image", "caption"} and/or {"image", "label"} '
                        'objects (optional "id"; image paths relative to the file)')
    evaluate.add_argument("--split", default="test", help="dataset split: test, train (emoji also: all)")
    evaluate.add_argument("--limit", type=_positive, help="evaluate a seeded random subset of this many images")
    evaluate.add_argument("--anchors", help="ASIF only: comma-separated collection sizes for the accuracy "
                          "curve, e.g. 100,500,1500")
    _template_option(evaluate)
    _model_options(evaluate)
    evaluate.set_defaults(func=_clean_errors("evaluate", run_evaluate))

    classify = subparsers.add_parser("classify", help="zero-shot classification of images among labels")
    classify.add_argument("images", nargs="+", help="image paths, folders, globs or fsspec URIs")
    classify.add_argument("--labels", nargs="+", required=True, help="class names, e.g. gatto cane 'un cavallo'")
    classify.add_argument("--truth", nargs="+", help="the right label of each image, for accuracy and a confusion matrix")
    classify.add_argument("--top-k", type=_positive, default=3, help="labels reported per image")
    classify.add_argument("--aggregate", choices=("mean", "max"), default="mean",
                          help="ensembling over templates: mean embedding or best caption")
    _template_option(classify)
    _model_options(classify)
    classify.set_defaults(func=_clean_errors("classify", run_classify))

    retrieve = subparsers.add_parser("retrieve", help="text-to-image or image-to-text retrieval")
    retrieve.add_argument("--texts", nargs="+", required=True, help="queries or gallery texts")
    retrieve.add_argument("--images", nargs="+", required=True, help="image paths, folders, globs or fsspec URIs")
    retrieve.add_argument("--direction", choices=("text-to-image", "image-to-text"), default="text-to-image")
    retrieve.add_argument("--top-k", type=_positive, default=5, help="matches reported per query")
    retrieve.add_argument("--backend", choices=("numpy", "faiss"), default="numpy",
                          help="search backend (faiss: DualEncoder only, pip install faiss-cpu)")
    _model_options(retrieve)
    retrieve.set_defaults(func=_clean_errors("retrieve", run_retrieve))

    localize = subparsers.add_parser("localize", help="occlusion maps: where in each image each text is")
    localize.add_argument("images", nargs="+", help="image paths, folders, globs or fsspec URIs")
    localize.add_argument("--texts", nargs="+", required=True, help="what to find, e.g. 'un gatto'")
    localize.add_argument("--patch-fraction", type=_fraction, default=0.25, help="patch side / shorter image side")
    localize.add_argument("--stride-fraction", type=_fraction, default=0.5, help="step between patches / patch side")
    localize.add_argument("--grid", type=_positive, default=8, help="cells per side of the coarse map in the JSON")
    _model_options(localize)
    localize.set_defaults(func=_clean_errors("localize", run_localize))
