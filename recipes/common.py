"""What the training recipes share: the command line, backend and devices, results.

Each recipe reads top to bottom as a complete example of building, training and evaluating a
`kci.DualEncoder`; the plumbing that is the same in all of them lives here. Nothing here imports Keras
at module level: the backend is chosen from the command line and must be set before Keras is imported.
"""

import argparse
import contextlib
import json
import os
import platform
import time

from keras_clip_it.distribution import KINDS

RESULTS_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "results"))
# The pretrained text towers: English sentence embeddings, and a multilingual model for Italian.
TEXT_PRESETS = {"en": "all_minilm_l6_v2", "it": "multilingual_e5_small"}


def parse_args(doc, epochs, batch_size, learning_rate, lang="en", extra=None):
    """The options every recipe takes; `extra(parser)` adds a recipe's own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--backend", choices=("jax", "tensorflow"), default="jax")
    parser.add_argument("--distribution", choices=KINDS, default="none",
                        help="none: one device; data-parallel: every local device (keras.distribution.DataParallel\n"
                             "on JAX, tf.distribute.MirroredStrategy on TensorFlow); tpu: the TPU cores\n"
                             "(DataParallel on JAX, TPUStrategy on TensorFlow)")
    parser.add_argument("--tpu", default="", help="TPU name or address for TPUStrategy (default: the local TPU VM)")
    parser.add_argument("--cpu-devices", type=int, default=0,
                        help="split the host CPU into this many devices, to try data-parallel without accelerators")
    parser.add_argument("--lang", choices=sorted(TEXT_PRESETS), default=lang, help="language of the captions")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size, help="global batch, over all devices")
    parser.add_argument("--learning-rate", type=float, default=learning_rate)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="a few steps on a few pairs, to check that everything runs (results not written)")
    parser.add_argument("--output", default=None,
                        help="results JSON (default benchmarks/results/train_<recipe>_<lang>.json, not with --quick)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2: a contrastive batch needs negatives")
    return args


def set_backend(args):
    """Selects the Keras backend and the host devices; call before importing keras or keras_clip_it."""
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from keras_clip_it.distribution import split_host_cpu

    # tf.data feeds every backend; it must never take an accelerator away from JAX.
    tf.config.set_visible_devices([], "GPU")
    split_host_cpu(args.cpu_devices)


def distribution(args):
    """The `kci.distribution.Distribution` of --distribution (and --tpu); a missing TPU ends the run."""
    from keras_clip_it.distribution import Distribution

    try:
        return Distribution(args.distribution, tpu=args.tpu)
    except RuntimeError as error:
        raise SystemExit(f"--distribution {args.distribution}: {error}") from None


def emoji_split(kci, lang, split, quick):
    """The embedded emoji pairs of one split (a few of them with --quick)."""
    images, captions = kci.datasets.emoji_pairs(lang=lang, split=split)
    if quick:
        count = 64 if split == "train" else 32
        images, captions = images[:count], captions[:count]
    return images, list(captions)


def shorten_sequences(text_encoder, captions, multiple=8):
    """Pads captions to the longest training caption (rounded up to `multiple`), not the tower's 256-512.

    `kci.data.pairs` pads every batch to the preprocessor's sequence length (static shapes); emoji names
    are a few tokens long, so the default length would spend most of each step on padding.
    """
    longest = int(text_encoder.tokenize(captions)["padding_mask"].sum(axis=1).max())
    text_encoder.preprocessor.sequence_length = min(-(-longest // multiple) * multiple, text_encoder.sequence_length)
    return text_encoder.sequence_length


def text_groups_to_train(encoder, requested=None):
    """What `lock("text", unlocked_groups=)` takes to train the top `requested` transformer blocks (None:
    all of them) while the token embeddings, the bottom groups of the backbone, stay frozen."""
    from keras_clip_it.models.dual_encoder import layer_groups

    groups = layer_groups(encoder.backbone)
    first = next(i for i, group in enumerate(groups) if "embedding" not in group.name)
    above = len(groups) - first
    if requested is None:
        return above
    if not 0 < requested <= above:
        raise SystemExit(f"--text-unlocked-groups must be between 1 and {above} for {encoder.name}, got {requested}")
    return requested


def text_groups_option(parser):
    parser.add_argument("--text-unlocked-groups", type=int, default=None,
                        help="train only the top N groups of the text tower (default: every block above the\n"
                             "token embeddings; fewer make each step cheaper on CPU)")


class Timer:
    """Wall-clock seconds of a block: `with timer("fit"): ...`, then `timer.seconds["fit"]`."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {self.seconds[name]:.0f}s", flush=True)


def report(recipe, args, distribution, metrics, test_pairs, **details):
    """Prints held-out recall both ways as a table and writes the results JSON (not for --quick runs)."""
    import keras

    chance = 1.0 / test_pairs
    print(f"\n{recipe}, {args.lang}, {args.backend}, {distribution.describe()}: {test_pairs} held-out pairs, "
          f"chance R@1 = {chance:.4f}")
    print("| direction | R@1 | R@5 | R@10 | R@1 / chance |\n|---|---|---|---|---|")
    for direction, label in (("image_to_text", "image -> caption"), ("text_to_image", "caption -> image")):
        r = [metrics[f"{direction}_R@{k}"] for k in (1, 5, 10)]
        print(f"| {label} | {r[0]:.3f} | {r[1]:.3f} | {r[2]:.3f} | {r[0] / chance:.1f}x |")
    results = {
        "recipe": recipe,
        "lang": args.lang,
        "backend": args.backend,
        "distribution": args.distribution,
        "devices": distribution.devices,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, keras {keras.__version__}",
        "quick": args.quick,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "test_pairs": test_pairs,
        "chance_R@1": chance,
        "metrics": {name: round(float(value), 4) for name, value in metrics.items()},
        **details,
    }
    output = args.output
    if output is None and not args.quick:
        output = os.path.join(RESULTS_DIR, f"train_{recipe}_{args.lang}.json")
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as handle:
            json.dump(results, handle, indent=1)
        print(f"results written to {output}")
    return results


def results_table(results_dir=RESULTS_DIR):
    """Markdown table of the recipes' held-out recall (benchmarks/results/train_*.json), with ASIF beside.

    ASIF rows come from the LiT runs (same frozen image features, same split, default k and p) and, when
    present, from recipes/asif_emoji.py (224 px features, k and p chosen on a validation split).
    """
    rows = []
    names = {"clip": "CLIP from scratch", "lit": "LiT", "clip_italian": "CLIP-Italian schedule"}

    def recall(metrics, prefix=""):
        return " / ".join(f"{metrics[f'{prefix}R@{k}']:.3f}" for k in (1, 5, 10))

    for recipe in ("clip", "lit", "clip_italian"):
        for lang in sorted(TEXT_PRESETS):
            path = os.path.join(results_dir, f"train_{recipe}_{lang}.json")
            if not os.path.exists(path):
                continue
            with open(path) as handle:
                r = json.load(handle)
            m = r["metrics"]
            name = names[recipe]
            if recipe == "clip_italian" and r["schedule"]["unlock_epoch"] >= r["epochs"]:
                name += " (phase 1 only: heads on frozen towers)"
            rows.append(f"| {name} | {lang} | {r['epochs']} | {recall(m, 'image_to_text_')} | "
                        f"{recall(m, 'text_to_image_')} | {m['image_to_text_R@1'] / r['chance_R@1']:.0f}x | "
                        f"{r['seconds']['fit']:.0f} s |")
            if recipe == "lit":
                a = r["asif"]["metrics"]
                rows.append(f"| ASIF (k={r['asif']['k']}, p={r['asif']['p']:g}), LiT's frozen towers | {lang} | - | "
                            f"{recall(a, 'image_to_text_')} | {recall(a, 'text_to_image_')} | "
                            f"{a['image_to_text_R@1'] / r['chance_R@1']:.0f}x | - |")
    path = os.path.join(results_dir, "asif_emoji.json")
    if os.path.exists(path):
        with open(path) as handle:
            asif = json.load(handle)["languages"]
        for lang, r in sorted(asif.items()):
            best = r.get("joint", r["best"])
            rows.append(f"| ASIF (k={best['k']}, p={best['p']:g}), 224 px, recipes/asif_emoji.py | {lang} | - | "
                        f"{recall(best['test'])} | - | {best['test']['R@1'] * r['test_queries']:.0f}x | - |")
    header = ("| model | captions | epochs | image -> caption R@1 / 5 / 10 | caption -> image R@1 / 5 / 10 "
              "| image -> caption R@1 / chance | fit time |\n|---|---|---|---|---|---|---|")
    return "\n".join([header] + rows)


def history_summary(history):
    """First and last value of each logged quantity of a `fit` history."""
    return {name: [round(float(values[0]), 4), round(float(values[-1]), 4)] for name, values in history.history.items()}


if __name__ == "__main__":
    print(results_table())
