"""TF SavedModel export: `encode_image`, `encode_text`, `encode_tokens` and `classify` endpoints for TF Serving.

The networks are converted with Keras' own `keras.export.ExportArchive` (through jax2tf on JAX, as they are
on TensorFlow); the steps around them, which only exist as Python and numpy in the Keras models, are
written here in TensorFlow ops so the SavedModel needs no Python at all: tokenisation (the tokenizer's
own TensorFlow graph), L2 normalisation, ASIF's exact top-k relative representations against the
collection, and the sparse products with the label representations fixed at export time.
"""

import json
import os
import shutil
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_clip_it.encoders.image_encoder import ImageEncoder
from keras_clip_it.encoders.text_encoder import TextEncoder
from keras_clip_it.models.asif import ASIF
from keras_clip_it.models.asif_state import UNKNOWN
from keras_clip_it.models.dual_encoder import DualEncoder
from keras_clip_it.search import AnchorIndex
from keras_clip_it.templates import ensemble
from keras_clip_it.version import __version__

METADATA_FILE = "keras_clip_it.json"
SUPPORTED = "kci.DualEncoder, kci.ASIF, kci.ImageEncoder or kci.TextEncoder"


def export(model, path, labels=None, templates=None, overwrite=False):
    """Writes `model` as a TensorFlow SavedModel with serving endpoints, for TF Serving or `tf.saved_model.load`.

    The SavedModel runs without keras-clip-it, Keras or JAX: a server needs TensorFlow, plus TensorFlow
    Text's ops for `encode_text` (`import tensorflow_text` before loading in Python). Endpoints, each
    also a serving signature:

    - `encode_image(images)`: uint8 (N, H, W, 3) at the image encoder's size (resize and crop first,
      as `model.image_encoder.preprocess` does) -> {"embeddings": float32 (N, D), L2-normalised}.
    - `encode_text(texts)`: string (N,) -> {"embeddings"}; the tokenizer runs inside the graph. If a
      tokenizer cannot run as a TensorFlow graph, `encode_text` takes the token inputs instead (a
      warning says so, and the metadata file has `"text_input": "tokens"`).
    - `encode_tokens(tokens)`: the text encoder's inputs, int32 (N, sequence_length) each
      ("token_ids", "padding_mask", ...) -> {"embeddings"}, for clients that tokenise themselves.
    - `classify(images)` (with `labels`): {"scores": float32 (N, C), "label_index": int64 (N,),
      "label": string (N,)}. Scores are those of `kci.ZeroShotClassifier(model, labels, templates)`:
      cosine similarities for a DualEncoder, sparse ASIF similarities for an ASIF, whose `label` is
      "unknown" (index -1) when the best score is at or below the model's `unknown_threshold`.

    For an ASIF, `encode_image` and `encode_text` also return the exact sparse relative representation,
    "anchor_indices" int64 (N, k) and "anchor_weights" float32 (N, k), as `asif.encode_images` does; the
    collection's anchors (in the model's `anchor_dtype`) and the label representations are stored in the
    SavedModel, so later edits of the collection do not reach it: export again. A bare `ImageEncoder`
    exports `encode_image` only, a bare `TextEncoder` the text endpoints only (their embeddings are the
    encoder's features, L2-normalised, as `embed` returns). `serving_default` is `classify` when there
    are labels, else the first endpoint. A `keras_clip_it.json` file next to the model describes the
    endpoints, sizes, labels and collection.

    Args:
        model: a `kci.DualEncoder`, a `kci.ASIF` with a collection (over `kci.ImageEncoder` and
            `kci.TextEncoder` towers), a `kci.ImageEncoder` or a `kci.TextEncoder`.
        path: a local directory or an fsspec URI ("s3://bucket/models/clip-it/1", "memory://...");
            remote destinations are written locally first, then copied.
        labels: list of str class names for `classify`, or None for no `classify` endpoint.
        templates: prompt templates for the labels, as in `kci.ZeroShotClassifier` ("it", "en",
            "it-short", a string with "{}", a list of those), or None to use the labels as captions.
        overwrite: replace an existing non-empty directory at `path`.

    Returns:
        The endpoint names, in the order they were written.

    Example:
    >>> import keras_clip_it as kci, tensorflow as tf, tensorflow_text
    >>> img = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
    >>> txt = kci.TextEncoder.from_preset("multilingual_e5_small")
    >>> model = kci.DualEncoder(img, txt, projection_dim=256)
    >>> kci.serving.export(model, "/tmp/clip_it/1", labels=["gatto", "cane"], templates="it")
    ['encode_image', 'encode_tokens', 'encode_text', 'classify']
    >>> served = tf.saved_model.load("/tmp/clip_it/1")
    >>> served.classify(tf.zeros((1, 224, 224, 3), tf.uint8))["label"].shape
    TensorShape([1])
    """
    towers = _towers(model)
    labels = _check_labels(model, towers, labels, templates)
    target, remote = _destination(path, overwrite)
    # Written to a staging directory first: a failed export leaves any previous model at `path` untouched.
    staging = tempfile.mkdtemp(prefix=".kci_export_", dir=None if remote else os.path.dirname(os.path.abspath(target)))
    try:
        root, endpoints, metadata = _build(model, towers, labels, templates)
        signatures = {name: function.get_concrete_function() for name, function in endpoints.items()}
        signatures["serving_default"] = signatures["classify" if "classify" in endpoints else next(iter(endpoints))]
        for name, function in endpoints.items():
            setattr(root, name, function)
        tf.saved_model.save(root, staging, signatures=signatures)
        with open(os.path.join(staging, METADATA_FILE), "w", encoding="utf-8") as handle:
            json.dump({**metadata, "endpoints": list(endpoints)}, handle, indent=1, ensure_ascii=False)
        if remote is not None:
            _copy_to(staging, remote, overwrite)
        else:
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return list(endpoints)


# === What each model exports ===


class _Towers:
    """The Keras parts of a model that are exported: functions of images and tokens, in keras ops."""

    def __init__(self, tracked, image_encoder=None, text_encoder=None, embed_images=None, embed_tokens=None):
        self.tracked = tracked
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.embed_images = embed_images
        self.embed_tokens = embed_tokens


def _normalize(features):
    features = keras.ops.cast(features, "float32")
    return features / keras.ops.maximum(keras.ops.norm(features, axis=-1, keepdims=True), 1e-12)


def _towers(model):
    if isinstance(model, DualEncoder):
        return _Towers(
            [model],
            model.image_encoder,
            model.text_encoder,
            lambda images: model({"images": images})["image_embeddings"],
            lambda tokens: model({"texts": tokens})["text_embeddings"],
        )
    if isinstance(model, ASIF):
        for name, encoder, kind in (
            ("image_encoder", model.image_encoder, ImageEncoder),
            ("text_encoder", model.text_encoder, TextEncoder),
        ):
            if not isinstance(encoder, kind):
                raise TypeError(
                    f"this ASIF's {name} is a {type(encoder).__name__}; only kci.ImageEncoder and kci.TextEncoder "
                    "towers can be exported, because the SavedModel must run the encoder itself"
                )
        if model.collection is None or not len(model.collection):
            raise ValueError(
                "this ASIF model has no anchors: call use(collection) or add(ids, ...) before exporting, since "
                "the collection is stored in the SavedModel"
            )
        return _Towers(
            [model.image_encoder, model.text_encoder],
            model.image_encoder,
            model.text_encoder,
            lambda images: _normalize(model.image_encoder(images)),
            lambda tokens: _normalize(model.text_encoder(tokens)),
        )
    if isinstance(model, ImageEncoder):
        return _Towers([model], image_encoder=model, embed_images=lambda images: _normalize(model(images)))
    if isinstance(model, TextEncoder):
        return _Towers([model], text_encoder=model, embed_tokens=lambda tokens: _normalize(model(tokens)))
    raise TypeError(f"cannot export a {type(model).__name__}: pass a {SUPPORTED}")


def _check_labels(model, towers, labels, templates):
    if labels is None:
        if templates is not None:
            raise ValueError("templates= was given without labels=: pass labels=[...] to export a classify endpoint")
        return None
    if towers.image_encoder is None or towers.text_encoder is None:
        raise ValueError(
            f"labels= needs a model with both towers for the classify endpoint; a {type(model).__name__} has one: "
            "export a DualEncoder or an ASIF, or leave out labels"
        )
    if isinstance(labels, str):
        raise TypeError(f"labels must be a list of class names, got the single string {labels!r}")
    labels = list(labels)
    bad = [label for label in labels if not isinstance(label, str)]
    if bad:
        raise TypeError(f"labels must be strings, got {bad[:3]}")
    if not labels:
        raise ValueError("labels is empty: give at least one class name, or labels=None for no classify endpoint")
    return labels


def _destination(path, overwrite):
    """(local directory, None) or (None, remote URI); refuses to replace a model unless told to."""
    path = os.fspath(path)
    if "://" in path and not path.startswith("file://"):
        import fsspec

        fs, remote = fsspec.core.url_to_fs(path)
        if fs.exists(remote) and fs.ls(remote) and not overwrite:
            raise FileExistsError(f"{path} already exists and is not empty: pass overwrite=True to replace it")
        return None, path
    local = path[len("file://"):] if path.startswith("file://") else path
    if os.path.isfile(local):
        raise FileExistsError(f"{local} is a file: a SavedModel is a directory, pick another path")
    if os.path.isdir(local) and os.listdir(local) and not overwrite:
        raise FileExistsError(f"{local} already exists and is not empty: pass overwrite=True to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    return local, None


def _copy_to(local, remote, overwrite):
    import fsspec

    fs, target = fsspec.core.url_to_fs(remote)
    if overwrite and fs.exists(target):
        fs.rm(target, recursive=True)
    fs.makedirs(target, exist_ok=True)
    for directory, _, files in os.walk(local):
        relative = os.path.relpath(directory, local)
        folder = target if relative == "." else f"{target.rstrip('/')}/{relative.replace(os.sep, '/')}"
        fs.makedirs(folder, exist_ok=True)
        for name in files:
            fs.put_file(os.path.join(directory, name), f"{folder.rstrip('/')}/{name}")


# === Building the endpoints ===


def _build(model, towers, labels, templates):
    """(the tf.Module holding what the endpoints use, {name: endpoint tf.function} in order, metadata)."""
    root = tf.Module()
    converter = keras.export.ExportArchive()
    for layer in towers.tracked:
        converter.track(layer)
    options = {"jax2tf_kwargs": {"with_gradient": False}} if keras.backend.backend() == "jax" else {}
    metadata = {"keras_clip_it": __version__, "model": type(model).__name__, "keras_backend": keras.backend.backend()}
    endpoints = {}
    post = _Relative(model, root) if isinstance(model, ASIF) else None
    if post is not None:
        metadata.update(post.metadata)

    embed_images = None
    if towers.image_encoder is not None:
        height, width = towers.image_encoder.image_size
        spec = tf.TensorSpec((None, height, width, 3), tf.uint8, name="images")
        embed_images = _any_batch(
            converter.add_endpoint("images", towers.embed_images, input_signature=[spec], **options)
        )
        endpoints["encode_image"] = _encode_endpoint(embed_images, spec, post, "image")
        metadata["image_size"] = [height, width]

    if towers.text_encoder is not None:
        encoder = towers.text_encoder
        names = encoder._input_names()
        length = encoder.sequence_length
        token_specs = {name: tf.TensorSpec((None, length), tf.int32, name=name) for name in names}
        embed_tokens = _any_batch(
            converter.add_endpoint("tokens", towers.embed_tokens, input_signature=[token_specs], **options)
        )
        endpoints["encode_tokens"] = _encode_endpoint(embed_tokens, token_specs, post, "text")
        endpoints["encode_text"], text_input = _text_endpoint(encoder, embed_tokens, token_specs, post)
        # Resources the tokenizer's graph uses (sentencepiece models, lookup tables) must be saved with it.
        root.tokenizer = _tf_objects(encoder.preprocessor)
        metadata.update(sequence_length=length, token_inputs=names, text_input=text_input)

    root.model_variables = list(converter.variables)
    if labels is not None:
        endpoints["classify"] = _classify_endpoint(model, root, embed_images, spec, post, labels, templates)
        metadata.update(labels=labels, templates=_describe_templates(templates))
    embedding = endpoints[next(iter(endpoints))].get_concrete_function().structured_outputs["embeddings"]
    metadata["embedding_dim"] = int(embedding.shape[-1])
    return root, endpoints, metadata


def _describe_templates(templates):
    """The templates as JSON can hold them (a callable is named, its text cannot be written)."""
    if templates is None or isinstance(templates, str):
        return templates
    if callable(templates):
        return f"<callable {getattr(templates, '__name__', type(templates).__name__)}>"
    return [_describe_templates(template) for template in templates]


def _encode_endpoint(embed, spec, post, kind):
    @tf.function(input_signature=[spec], autograph=False)
    def encode(inputs):
        embeddings = embed(_checked_images(inputs) if kind == "image" else inputs)
        outputs = {"embeddings": embeddings}
        if post is not None:
            outputs.update(post.represent(embeddings, kind))
        return outputs

    return encode


def _any_batch(embed):
    """`embed` that also takes an empty batch (jax2tf's symbolic batch size must be at least 1): an empty
    batch runs as one row of zeros, and no row is returned."""

    def run(inputs):
        count = tf.shape(tf.nest.flatten(inputs)[0])[0]

        def one_row_if_empty(value):
            row = tf.zeros(tf.concat([[1], tf.shape(value)[1:]], axis=0), value.dtype)
            return tf.cond(count > 0, lambda: value, lambda: row)

        return embed(tf.nest.map_structure(one_row_if_empty, inputs))[:count]

    return run


def _checked_images(images):
    """`images` after run-time checks of its shape: serving signatures do not enforce their declared shapes."""
    height, width = images.shape[1:3]
    shape = tf.shape(images)
    padded = tf.concat([shape, tf.zeros([4], tf.int32)], axis=0)
    right_shape = tf.logical_and(
        tf.equal(tf.size(shape), 4), tf.reduce_all(tf.equal(padded[1:4], tf.constant([height, width, 3])))
    )
    check = tf.debugging.Assert(
        right_shape,
        [f"images must be uint8 (N, {height}, {width}, 3): resize and crop them to the encoder's size first "
         "(its preprocess() does); got shape", shape],
    )
    with tf.control_dependencies([check]):
        return tf.identity(images)


def _text_endpoint(encoder, embed_tokens, token_specs, post):
    """`encode_text` on strings when the tokenizer runs as a TensorFlow graph, else on tokens."""
    names = list(token_specs)

    @tf.function(input_signature=[tf.TensorSpec((None,), tf.string, name="texts")], autograph=False)
    def encode_text(texts):
        if encoder.prefix:
            texts = tf.strings.join([encoder.prefix, texts])
        tokens = encoder.preprocessor(texts)
        if isinstance(tokens, tuple):  # keras-hub task preprocessors return (x, y, sample_weight)
            tokens = tokens[0]
        embeddings = embed_tokens({name: tf.cast(tokens[name], tf.int32) for name in names})
        outputs = {"embeddings": embeddings}
        if post is not None:
            outputs.update(post.represent(embeddings, "text"))
        return outputs

    try:
        encode_text.get_concrete_function()
        return encode_text, "strings"
    except Exception as error:  # noqa: BLE001 - any tokenizer that cannot be traced falls back the same way
        warnings.warn(
            f"the text encoder's tokenizer ({type(encoder.preprocessor).__name__}) cannot run as a TensorFlow "
            f"graph ({type(error).__name__}: {error}); encode_text takes token inputs {names} instead of strings: "
            "tokenise with the encoder's tokenize() on the client",
            stacklevel=3,
        )
        return _encode_endpoint(embed_tokens, token_specs, post, "text"), "tokens"


def _tf_objects(layer):
    """TensorFlow trackables (tf_text tokenizers and their resources) held by a Keras layer and its sublayers."""
    found = []
    for sublayer in layer._flatten_layers(include_self=True, recursive=True):
        for value in vars(sublayer).values():
            if isinstance(value, tf.Module) and all(value is not other for other in found):
                found.append(value)
    return found


def _classify_endpoint(model, root, embed_images, spec, post, labels, templates):
    names = tf.constant(labels + [UNKNOWN])
    if post is not None:
        score = post.class_scores(post.state.class_representations(labels, templates), len(labels))
        threshold = float(post.state.unknown_threshold)
    else:
        root.label_embeddings = tf.Variable(
            ensemble(model.encode_texts, labels, templates), trainable=False, name="label_embeddings"
        )

        def score(embeddings):
            return tf.matmul(embeddings, root.label_embeddings, transpose_b=True)

        threshold = None

    @tf.function(input_signature=[spec], autograph=False)
    def classify(images):
        embeddings = embed_images(_checked_images(images))
        if post is not None:
            represented = post.represent(embeddings, "image")
            scores = score(represented["anchor_indices"], represented["anchor_weights"])
        else:
            scores = score(embeddings)
        best = tf.argmax(scores, axis=1)
        if threshold is not None:
            confident = tf.reduce_max(scores, axis=1) > threshold
            best = tf.where(confident, best, tf.constant(-1, tf.int64))
        label = tf.gather(names, tf.where(best < 0, tf.constant(len(labels), tf.int64), best))
        return {"scores": scores, "label_index": best, "label": label}

    return classify


class _Relative:
    """ASIF's relative representations and sparse class scores, in TensorFlow ops over stored anchors."""

    def __init__(self, asif, root):
        # One published state: the anchors, k, p and threshold exported all belong to one version.
        state = asif.snapshot()
        self.k = {}
        self.p = float(state.p)
        self.anchors = {}
        self.centers = {}
        self.pooling = state.label_pooling
        for kind in ("image", "text"):
            # A fresh index stores the anchors exactly as the model scores them (centred when the model
            # centres; float32, or float16 / int8 with per-row scales), in collection row order.
            index = AnchorIndex(state.anchors.searched_rows(kind), dtype=state.anchors.dtype)
            center = state.anchors.center(kind)
            if center is not None:
                self.centers[kind] = tf.Variable(center, trainable=False, name=f"{kind}_center")
            stored = tf.Variable(index.stored, trainable=False, name=f"{kind}_anchors")
            scales = None if index.scales is None else tf.Variable(index.scales, trainable=False, name=f"{kind}_scales")
            self.anchors[kind] = (stored, scales)
            self.k[kind] = min(state.k, index.size)
        root.anchors = [variable for pair in self.anchors.values() for variable in pair if variable is not None]
        root.centers = list(self.centers.values())
        self.root = root
        self.state = state
        self.metadata = {
            "k": state.k,
            "p": self.p,
            "anchors": state.pairs,
            "anchor_dtype": state.anchors.dtype,
            "collection": state.name,
            "collection_version": int(state.collection_version),
            "unknown_threshold": float(state.unknown_threshold),
            "label_pooling": state.label_pooling,
            "centered": bool(self.centers),
        }

    def represent(self, embeddings, kind):
        """{"anchor_indices", "anchor_weights"}: the k most similar anchors, weights max(s, 0)^p normalised."""
        stored, scales = self.anchors[kind]
        if kind in self.centers:  # as the model does: centred on the side's anchor mean, normalised again
            embeddings = embeddings - self.centers[kind][None, :]
            embeddings = embeddings / tf.maximum(tf.norm(embeddings, axis=1, keepdims=True), 1e-12)
        similarities = tf.matmul(embeddings, tf.cast(stored, tf.float32), transpose_b=True)
        if scales is not None:
            similarities = similarities * scales[None, :]
        values, indices = tf.math.top_k(similarities, k=self.k[kind], sorted=True)
        weights = tf.pow(tf.maximum(values, 0.0), self.p)
        norms = tf.norm(weights, axis=1, keepdims=True)
        weights = tf.where(norms > 0, weights / tf.maximum(norms, 1e-30), 0.0)
        return {"anchor_indices": tf.cast(indices, tf.int64), "anchor_weights": weights}

    def class_scores(self, representation, labels):
        """A function (indices, weights) -> (Q, C) scores against fixed class representations, exactly sparse.

        `representation` has one row per label or one per caption (pooled by max or mean over each
        label's captions, as the model's `label_pooling` says). The class entries are stored sorted by
        anchor (an inverted index): each query entry finds the class entries on its anchor by binary
        search and the products are summed per (query, class), as
        `keras_clip_it.models.asif_state.sparse_inner` does; work grows with the matches, never with the
        collection size.
        """
        classes, k = representation.indices.shape
        anchors = representation.indices.ravel()
        order = np.argsort(anchors, kind="stable")
        self.root.class_anchors = tf.Variable(anchors[order].astype(np.int64), trainable=False, name="class_anchors")
        self.root.class_rows = tf.Variable(
            np.repeat(np.arange(classes), k)[order].astype(np.int64), trainable=False, name="class_rows"
        )
        self.root.class_weights = tf.Variable(
            representation.values.ravel()[order].astype(np.float32), trainable=False, name="class_weights"
        )
        root = self.root
        group, pooling = classes // labels, self.pooling

        def scores(indices, weights):
            queries, kept = tf.shape(indices, out_type=tf.int64)[0], tf.shape(indices, out_type=tf.int64)[1]
            query_anchors = tf.reshape(indices, [-1])
            query_weights = tf.reshape(weights, [-1])
            query_rows = tf.repeat(tf.range(queries), kept)
            sorted_anchors = root.class_anchors[None, :]
            starts = tf.searchsorted(sorted_anchors, query_anchors[None, :], side="left", out_type=tf.int64)[0]
            stops = tf.searchsorted(sorted_anchors, query_anchors[None, :], side="right", out_type=tf.int64)[0]
            matches = tf.ragged.range(starts, stops)
            entry = matches.value_rowids()
            position = matches.flat_values
            target = tf.gather(query_rows, entry) * classes + tf.gather(root.class_rows, position)
            products = tf.gather(query_weights, entry) * tf.gather(root.class_weights, position)
            total = tf.math.unsorted_segment_sum(products, target, queries * classes)
            if group == 1:
                return tf.reshape(total, [queries, classes])
            per_caption = tf.reshape(total, [queries, labels, group])
            return tf.reduce_max(per_caption, axis=2) if pooling == "max" else tf.reduce_mean(per_caption, axis=2)

        return scores
