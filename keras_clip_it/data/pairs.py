"""Input pipelines of (image, caption) pairs for `DualEncoder.fit`, from arrays or from manifests.

The pipeline is a `tf.data.Dataset`, which `fit` accepts on every backend. Everything that cannot run in
a graph (decoding files, resizing, tokenising) happens on the host with the towers' own preprocessing,
so the model trains on exactly what `encode_images` and `encode_texts` see at inference. Shapes are
static (texts padded to the tokenizer's sequence length, incomplete last batches dropped), which TPUs
need and which keeps JAX from compiling a second step function.
"""

import csv
import io
import json
import os
import posixpath
import sys
import warnings

import numpy as np

from keras_clip_it.data.images import ImageDecodeError

ON_ERROR = ("raise", "skip")


def with_fit_options(data):
    """Turns off tf.data's autotuning thread, which TensorFlow's `fit` waits for, unless the options set it.

    Why: with autotuning on, each iterator starts a thread whose wake-ups grow further apart, and under
    TensorFlow 2.21 deleting the iterator can wait for that thread's next wake-up. Keras' TensorFlow
    `fit` deletes its iterator on the calling thread as it returns, so the call can end seconds after
    its last step, whatever the model (docs/training.md, "TensorFlow on CPU", has the measurements). On
    JAX, Keras reads the iterator from Python and nothing waits.
    With autotuning off there is no such thread; `prefetch(tf.data.AUTOTUNE)` still grows its buffer as
    it runs and `map(num_parallel_calls=tf.data.AUTOTUNE)` runs one call per core. `DualEncoder.fit`,
    `evaluate` and `predict` apply this to the tf.data pipelines they are given, and `pairs` builds its
    pipelines with it.

    Args:
        data: anything `fit` accepts; only a `tf.data.Dataset` whose options leave
            `autotune.enabled` unset is changed (set it to True to keep autotuning).

    Returns:
        `data` itself, or the dataset with `options.autotune.enabled = False`.

    Example:
    >>> import tensorflow as tf
    >>> from keras_clip_it.data.pairs import with_fit_options
    >>> with_fit_options(tf.data.Dataset.range(4).prefetch(tf.data.AUTOTUNE)).options().autotune.enabled
    False
    """
    tf = sys.modules.get("tensorflow")  # a tf.data.Dataset exists only once TensorFlow is imported
    if tf is None or not isinstance(data, tf.data.Dataset) or data.options().autotune.enabled is not None:
        return data
    options = tf.data.Options()
    options.autotune.enabled = False
    return data.with_options(options)


class ManifestError(ValueError):
    """A manifest row could not be used; the message names the manifest, the row and what to do."""


def read_manifest(uri, image_column="image", caption_column="caption"):
    """Reads (image reference, caption) rows from a CSV or JSON-lines manifest at any fsspec URI.

    Relative image references are resolved against the manifest's folder, so a manifest and its images
    can be moved together (to a bucket, a zip, another machine).

    Args:
        uri: path or fsspec URI of a `.csv` (with a header row) or `.jsonl` file.
        image_column: the column (CSV) or key (JSONL) holding the image path or URI.
        caption_column: the column or key holding the caption.

    Returns:
        (image_refs, captions, rows): lists of str and the 1-based row number of each pair in the file.
    """
    import fsspec

    name = os.fspath(uri)
    kind = "csv" if name.lower().endswith(".csv") else "jsonl" if name.lower().endswith((".jsonl", ".json")) else None
    if kind is None:
        raise ManifestError(f"manifest {name!r} must end in .csv or .jsonl")
    try:
        with fsspec.open(name, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ManifestError(f"manifest {name!r} does not exist: check the path or URI") from None
    records = []
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(text))
        missing = {image_column, caption_column} - set(reader.fieldnames or [])
        if missing:
            raise ManifestError(
                f"manifest {name!r} has columns {reader.fieldnames} but no {sorted(missing)}: name them in the "
                "header or pass image_column= / caption_column="
            )
        records = [(row_number, row) for row_number, row in enumerate(reader, start=1)]
    else:
        for row_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((row_number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ManifestError(f"manifest {name!r} row {row_number} is not valid JSON ({error})") from None
    base = _parent(name)
    refs, captions, rows = [], [], []
    for row_number, record in records:
        image, caption = record.get(image_column), record.get(caption_column)
        if not isinstance(image, str) or not image or not isinstance(caption, str):
            raise ManifestError(
                f"manifest {name!r} row {row_number} needs a string {image_column!r} and {caption_column!r}, "
                f"got {record!r}"
            )
        refs.append(image if "://" in image or os.path.isabs(image) else _join(base, image))
        captions.append(caption)
        rows.append(row_number)
    return refs, captions, rows


def _parent(uri):
    return posixpath.dirname(uri) if "://" in uri else os.path.dirname(os.path.abspath(uri))


def _join(base, relative):
    return posixpath.join(base, relative) if "://" in base else os.path.join(base, relative)


def pairs(
    images,
    captions=None,
    model=None,
    batch_size=32,
    shuffle=True,
    seed=None,
    on_error="raise",
    image_column="image",
    caption_column="caption",
):
    """Builds the `fit` input of a dual encoder: batches of preprocessed images and tokenised captions.

    Each element is `{"images": uint8 (B, H, W, 3), "texts": {"token_ids": int32 (B, L), ...}}`, what
    `DualEncoder` takes, with no labels. Arrays already at the image tower's size are sliced as they are;
    anything else (other sizes, PIL images, paths, URIs, a manifest) is decoded, resized and cropped by
    the tower's `preprocess`, lazily, one pair at a time.

    Args:
        images: a uint8 array (N, H, W, 3), a list of images of any kind `ImageEncoder.preprocess`
            takes, or the path/URI of a CSV or JSON-lines manifest of (image, caption) rows (then
            `captions` is None).
        captions: list of N strings.
        model: the `DualEncoder` (or anything with `image_encoder` and `text_encoder`) to be trained.
        batch_size: pairs per batch (the global batch on many devices); the last incomplete batch is
            dropped so every batch has the same shape.
        shuffle: reshuffle the pairs every epoch.
        seed: shuffling seed, for reproducible runs.
        on_error: what a pair whose image cannot be read does: "raise" (an error naming its row) or
            "skip" (a warning naming its row, once, and the pair is left out).
        image_column: manifest column or key of the image reference.
        caption_column: manifest column or key of the caption.

    Returns:
        a `tf.data.Dataset`, with tf.data's autotuning thread off (see `with_fit_options`).

    Example:
    >>> images, captions = kci.datasets.emoji_pairs(lang="it", split="train")  # doctest: +SKIP
    >>> model.fit(kci.data.pairs(images, captions, model=model, batch_size=64), epochs=5)  # doctest: +SKIP
    """
    import tensorflow as tf

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if model is None or not hasattr(model, "image_encoder") or not hasattr(model, "text_encoder"):
        raise ValueError("pass model=, the DualEncoder to train: its towers preprocess the images and captions")
    labels = None
    if isinstance(images, (str, os.PathLike)):
        if captions is not None:
            raise ValueError("a manifest holds its own captions: pass captions=None")
        manifest = os.fspath(images)
        images, captions, rows = read_manifest(manifest, image_column, caption_column)
        labels = [f"manifest {manifest!r} row {row}" for row in rows]
    if captions is None:
        raise ValueError("pass captions=, one string per image (or a manifest path as images)")
    captions = [captions] if isinstance(captions, str) else list(captions)
    count = len(images)
    if count != len(captions):
        raise ValueError(f"{count} images but {len(captions)} captions: pass one caption per image")
    if count < batch_size:
        raise ValueError(
            f"only {count} pairs, fewer than batch_size={batch_size}: every batch must be full (static shapes), "
            "so lower batch_size"
        )
    image_encoder, text_encoder = model.image_encoder, model.text_encoder
    tokens = text_encoder.tokenize(captions)
    size = tuple(image_encoder.image_size)
    image_spec = tf.TensorSpec((*size, 3), tf.uint8)
    text_spec = {name: tf.TensorSpec(value.shape[1:], tf.int32) for name, value in tokens.items()}

    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:] == (*size, 3) and images.dtype == np.uint8:
        dataset = tf.data.Dataset.from_tensor_slices({"images": images, "texts": tokens})
        if shuffle:
            dataset = dataset.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    else:
        items = list(images)
        labels = labels or [f"pair {index}" for index in range(count)]
        bad = set()
        rng = np.random.default_rng(seed)

        def generate():
            order = rng.permutation(count) if shuffle else range(count)
            for index in order:
                if index in bad:
                    continue
                try:
                    pixels = image_encoder.preprocess([items[index]])[0]
                except ImageDecodeError as error:
                    message = f"{labels[index]}: {error}"
                    if on_error == "raise":
                        raise ImageDecodeError(message + " (pass on_error='skip' to leave such pairs out)") from None
                    bad.add(index)
                    warnings.warn(f"skipping {message}", stacklevel=2)
                    continue
                yield {"images": pixels, "texts": {name: value[index] for name, value in tokens.items()}}

        dataset = tf.data.Dataset.from_generator(
            generate, output_signature={"images": image_spec, "texts": text_spec}
        )
    return with_fit_options(dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
