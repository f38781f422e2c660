"""ASIF: two frozen unimodal encoders made multimodal by a collection of (image, caption) pairs.

Norelli et al. 2022 ("ASIF: Coupled Data Turns Unimodal Models to Multimodal Without Training"): an
image and a text live in different spaces, but an image can be described by how similar it is to the
collection's images, and a text by how similar it is to the collection's captions. Because the i-th
image and the i-th caption are a pair, the two descriptions share coordinates, and their inner product
compares an image with a text. Keeping the top k similarities, raised to the power p, makes the
description sparse and sharp. Nothing is trained: the collection is the model, and every score traces
back to the pairs behind it.
"""

import collections as _collections
import dataclasses
import json
import os
import threading

import keras
import numpy as np

from keras_clip_it.collections.analogy_collection import AnalogyCollection
from keras_clip_it.search import AnchorIndex
from keras_clip_it.search import follow
from keras_clip_it.templates import fill

UNKNOWN = "unknown"
# Bounds the temporary arrays of the sparse product (entries matched at once).
_JOIN_CHUNK = 4_000_000


@dataclasses.dataclass
class RelativeRepresentation:
    """Sparse relative representations of a batch: k anchors per row, with non-negative weights.

    Row i is the vector with `values[i, j]` at position `indices[i, j]` of `num_anchors` and zeros
    elsewhere; it has unit L2 norm (or is zero when no anchor is similar at all).

    Attributes:
        indices: int64 (Q, k) anchor rows, by decreasing similarity.
        values: float32 (Q, k) weights.
        num_anchors: the collection size N.
        version: the collection version the rows refer to.
        collection: the `uid` of the collection the rows refer to (None: not recorded).
    """

    indices: np.ndarray
    values: np.ndarray
    num_anchors: int
    version: int
    collection: int = None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, rows):
        rows = np.arange(len(self))[rows]
        return RelativeRepresentation(
            self.indices[rows], self.values[rows], self.num_anchors, self.version, self.collection
        )

    def to_dense(self):
        """The (Q, N) float32 dense matrix (for small collections and tests)."""
        dense = np.zeros((len(self), self.num_anchors), np.float32)
        np.put_along_axis(dense, self.indices, self.values, axis=1)
        return dense


@dataclasses.dataclass
class Classification:
    """What `ASIF.classify` returns.

    Attributes:
        labels: list of str, the best label per query, or "unknown" when the evidence is weak.
        scores: float32 (Q, C) similarity of each query to each label, in [0, 1].
        indices: int64 (Q,) index of the best label, -1 for "unknown".
    """

    labels: list
    scores: np.ndarray
    indices: np.ndarray


@keras.saving.register_keras_serializable(package="keras_clip_it")
class ASIF(keras.Model):
    """A training-free image-text model over an analogy collection.

    A query image is compared with the N collection images; its k largest cosine similarities
    (negatives clipped to 0), raised to the power p and L2-normalised, form a sparse N-dimensional
    relative representation. A text is compared with the N captions in the same way. Since row i of
    both sides is the same pair, image-text similarity is the inner product of the two representations.

    The search is exact at any scale (`AnchorIndex`: bfloat16 screening with a certified error bound,
    then float32 rescoring), memory-bounded, and optionally sharded over devices. Anchors can be stored in
    float16 or int8 (per-row scales). Class-side representations are cached per collection version, so
    `add`, `remove` and `use` take effect on the next call.

    Swapping collections is O(1) once a collection has been used or `prepare`d: the model keeps the
    anchor indexes (and class representations) of the `keep_collections` collections it used or prepared
    last, the current one included, so `use` of one of them publishes them at once and the first query
    after the swap costs a steady query. Each kept collection costs its indexes' memory: per side, the
    stored anchors (N x D x 4 bytes in float32) plus the bfloat16 screening copy (N x D x 2), e.g. 4.6 GB
    for a 1M-pair collection with 384-d images and texts.

    Args:
        image_encoder: an image encoder with `embed(images) -> (n, D)` L2-normalised rows, `fingerprint`
            and `embedding_dim` (usually `kci.ImageEncoder`).
        text_encoder: likewise for texts (usually `kci.TextEncoder`).
        k: int, anchors kept per representation. The default (800, with p = 8, the paper's) holds up
            from 1,000 to 20,000+ anchors, with repeated captions too (Fashion-MNIST in docs/asif.md);
            small collections of distinct captions do better with a small k and a larger p (the emoji
            collection: k = 10, p = 16, tuned by recipes/asif_emoji.py).
        p: float, exponent applied to the kept similarities (larger = sharper).
        collection: an `AnalogyCollection`, a registered collection name, a URI, or None (start empty
            and `add` pairs).
        anchor_dtype: "float32", "float16" or "int8": how anchors are stored for search.
        unknown_threshold: float; `classify` says "unknown" when the best score is at or below it
            (0.0: only when the query shares no anchor with any label). Set it with `calibrate`.
        mesh: None, "auto" (all JAX devices), a `jax.sharding.Mesh` or a `keras.distribution.DeviceMesh`
            with one axis: anchors are spread over its devices. Not saved (devices differ per machine).
        keep_collections: int >= 1, collections whose indexes are kept for swapping back (the current
            one included). 1 keeps only the current collection's.

    Example:
    >>> import keras_clip_it as kci
    >>> img = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
    >>> txt = kci.TextEncoder.from_preset("multilingual_e5_small")
    >>> images, captions = kci.datasets.emoji_pairs(lang="it", split="train")
    >>> asif = kci.ASIF(img, txt)
    >>> asif.add([str(i) for i in range(len(captions))], images=images, captions=captions)
    >>> asif.classify(images[:2], labels=["gatto", "cane"], templates="it").labels
    """

    def __init__(
        self,
        image_encoder,
        text_encoder,
        k=800,
        p=8.0,
        collection=None,
        anchor_dtype="float32",
        unknown_threshold=0.0,
        mesh=None,
        keep_collections=2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # === Encoders ===
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        for name, encoder in (("image_encoder", image_encoder), ("text_encoder", text_encoder)):
            missing = [a for a in ("embed", "fingerprint", "embedding_dim") if not hasattr(encoder, a)]
            if missing:
                raise TypeError(f"{name} needs {missing} (see kci.ImageEncoder / kci.TextEncoder)")
        # === Config ===
        if int(k) < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        if not float(p) > 0:
            raise ValueError(f"p must be positive, got {p}")
        if anchor_dtype not in ("float32", "float16", "int8"):
            raise ValueError(f"anchor_dtype must be 'float32', 'float16' or 'int8', got {anchor_dtype!r}")
        if int(keep_collections) < 1:
            raise ValueError(f"keep_collections must be a positive integer, got {keep_collections}")
        self.k = int(k)
        self.p = float(p)
        self.anchor_dtype = anchor_dtype
        self.unknown_threshold = float(unknown_threshold)
        self.mesh = _as_mesh(mesh)
        self.keep_collections = int(keep_collections)
        self._label_embedding_cache = {}
        # What the model derived from its collection (one object, published by one assignment, so a
        # query reads the collection and its indexes from the same state) and from the others it keeps.
        self._current = None
        self._kept = _Kept()
        if collection is not None:
            self.use(collection)
        self.built = True

    # === Collection ===

    @property
    def collection(self):
        """The current `AnalogyCollection` (None before `use` or `add`)."""
        current = self._current
        return None if current is None else current.collection

    def use(self, collection):
        """Makes `collection` the model's anchors (embedding what it lacks with this model's encoders).

        O(1) for a collection used or prepared recently (see `keep_collections`): its indexes are
        published with it, and queries running meanwhile see the old or the new collection, never a mix.

        Args:
            collection: an `AnalogyCollection`, a registered name ("emoji-it") or an fsspec URI.
        """
        self._current = self._derived(collection, keep=None)

    def prepare(self, collection):
        """Builds the anchor indexes of `collection` ahead, so that a later `use` of it is O(1).

        A server preloading the collections it swaps between calls this for each; the model keeps the
        last `keep_collections` of them (the current one included).

        Args:
            collection: an `AnalogyCollection`, a registered name or an fsspec URI.

        Returns:
            The `AnalogyCollection` (pass it to `use`).

        Example:
        >>> import keras_clip_it as kci
        >>> img = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
        >>> txt = kci.TextEncoder.from_preset("multilingual_e5_small")
        >>> asif = kci.ASIF(img, txt, collection="emoji-it", k=10, p=16)
        >>> english = asif.prepare("emoji-en")  # embedded and indexed now, while emoji-it serves
        >>> asif.use(english)  # O(1): the next query costs a steady query
        """
        current = self._current
        derived = self._derived(collection, keep=None if current is None else current.collection)
        if len(derived.collection):
            for kind in ("image", "text"):
                self._index_state(derived, kind)
        return derived.collection

    def _derived(self, collection, keep):
        """The kept state of `collection` (resolved, embedded for this model's encoders), now most recent."""
        if isinstance(collection, (str, os.PathLike)):
            from keras_clip_it import collections

            collection = collections.load(collection)
        if not isinstance(collection, AnalogyCollection):
            raise TypeError(f"use() takes an AnalogyCollection, a name or a URI, got {type(collection).__name__}")
        collection.embed(image_encoder=self._missing("image", collection), text_encoder=self._missing("text", collection))
        return self._kept.get(collection, self.keep_collections, keep=keep)

    def _missing(self, kind, collection):
        encoder = self.image_encoder if kind == "image" else self.text_encoder
        return None if collection.has_embeddings(kind, encoder.fingerprint) or not len(collection) else encoder

    def add(self, ids, images=None, captions=None, image_embeddings=None, text_embeddings=None, **kwargs):
        """Adds pairs to the collection (a new in-memory one if the model has none).

        Args:
            ids: list of unique str ids.
            images: images for `image_encoder.embed`, or None when `image_embeddings` is given.
            captions: list of str.
            image_embeddings: optional (n, D) embeddings from this model's image encoder.
            text_embeddings: optional (n, D) embeddings of `captions` from this model's text encoder.
            **kwargs: `image_refs=` and `metadata=` for the collection.
        """
        if images is None and image_embeddings is None:
            raise ValueError("add() needs images= or image_embeddings=")
        if captions is None and text_embeddings is None:
            raise ValueError("add() needs captions= or text_embeddings=")
        if image_embeddings is None:
            image_embeddings = self.image_encoder.embed(images)
        if text_embeddings is None:
            text_embeddings = self.text_encoder.embed(list(captions))
        if self._current is None:
            self._current = self._kept.get(AnalogyCollection(name="asif"), self.keep_collections)
        current = self._current
        current.collection.add(
            ids,
            captions=captions,
            embeddings={
                "image": {self.image_encoder.fingerprint: _normalize(image_embeddings)},
                "text": {self.text_encoder.fingerprint: _normalize(text_embeddings)},
            },
            **kwargs,
        )
        self._follow(current)

    def remove(self, ids):
        """Removes the pairs with these ids from the collection."""
        current = self._require_current()
        current.collection.remove(ids)
        self._follow(current)

    def _follow(self, derived):
        # Follows the change now, so the next query pays nothing for it.
        for kind in list(derived.indexes) if len(derived.collection) else ():
            self._index_state(derived, kind)

    def _require_current(self):
        current = self._current
        if current is None or not len(current.collection):
            raise ValueError("this ASIF model has no anchors yet: call use(collection) or add(ids, ...) first")
        return current

    def _require_collection(self):
        return self._require_current().collection

    def index(self, kind):
        """The `AnchorIndex` over the collection's `kind` ("image"/"text") embeddings, kept up to date.

        After `add` / `remove` (here or on the collection) the cached index follows the recorded changes
        in O(pairs changed); it is built from scratch only for a collection the model has not kept (see
        `keep_collections`). Each update makes a new index and publishes it with one assignment, so
        concurrent queries use the old or the new one.
        """
        return self._index_state(self._require_current(), kind)[1]

    def _index_state(self, derived, kind):
        """(collection version, AnchorIndex) of `derived`'s collection for `kind`, brought up to date."""
        collection = derived.collection
        if not len(collection):
            raise ValueError("this ASIF model has no anchors yet: call use(collection) or add(ids, ...) first")
        cached = derived.indexes.get(kind)
        if cached is None or cached[0] != collection.version:
            encoder = self.image_encoder if kind == "image" else self.text_encoder
            with collection.lock:  # the collection does not change while its index catches up
                cached = derived.indexes.get(kind)
                if cached is None or cached[0] != collection.version:
                    index = None
                    if cached is not None:
                        index = follow(cached[1], collection, kind, encoder.fingerprint, cached[0])
                    if index is None:
                        anchors = collection.embeddings(kind, encoder.fingerprint)
                        index = AnchorIndex(anchors, dtype=self.anchor_dtype, mesh=self.mesh)
                    cached = (collection.version, index)
                    derived.indexes[kind] = cached
        return cached

    # === Representations ===

    def relative(self, embeddings, kind):
        """Relative representations of L2-normalised `embeddings` (n, D) against the `kind` anchors."""
        return self._relative(self._require_current(), embeddings, kind)

    def _relative(self, derived, embeddings, kind):
        version, index = self._index_state(derived, kind)
        return relative_representation(index, embeddings, self.k, self.p, version, derived.collection.uid)

    def encode_images(self, images=None, embeddings=None):
        """Sparse relative representations of images (or of their precomputed `embeddings`).

        A `RelativeRepresentation` passes through unchanged, so `classify` and `calibrate` can reuse the
        representations of queries scored several times.
        """
        if isinstance(images, RelativeRepresentation):
            return images
        if embeddings is None:
            embeddings = self.image_encoder.embed(images)
        return self.relative(embeddings, "image")

    def encode_texts(self, texts=None, embeddings=None):
        """Sparse relative representations of texts (or of their precomputed `embeddings`)."""
        if embeddings is None:
            embeddings = self.text_encoder.embed(list(texts) if not isinstance(texts, str) else [texts])
        return self.relative(embeddings, "text")

    def similarity(self, image_representations, text_representations):
        """(images x texts) float32 inner products of two batches of relative representations."""
        collection = self._require_collection()
        for rep in (image_representations, text_representations):
            if rep.collection not in (None, collection.uid):
                raise ValueError(
                    "a representation was computed against another collection than the current "
                    f"{collection.name!r}: encode it again"
                )
            if rep.version != collection.version:
                raise ValueError(
                    "a representation was computed before the collection changed: encode it again "
                    f"(it refers to version {rep.version}, the collection is at {collection.version})"
                )
        return sparse_inner(image_representations, text_representations)

    # === Tasks ===

    def class_representations(self, labels, templates=None):
        """Relative representations of each label (template embeddings averaged, then represented).

        Cached per (labels, templates) and collection version: repeated `classify` calls with the same
        labels embed nothing.
        """
        labels = _as_labels(labels)
        key = (tuple(labels), _templates_key(templates))
        derived = self._require_current()
        cached = derived.classes.get(key)
        if cached is None or cached[0] != derived.collection.version:
            representation = self._relative(derived, self._label_embeddings(key, labels, templates), "text")
            cached = derived.classes[key] = (representation.version, representation)
        return cached[1]

    def _label_embeddings(self, key, labels, templates):
        # Text embeddings do not depend on the collection: keep them across versions.
        cache = self._label_embedding_cache
        if key not in cache:
            captions = [fill(templates, label) for label in labels]
            flat = self.text_encoder.embed([c for group in captions for c in group])
            per_label = flat.reshape(len(labels), -1, flat.shape[-1]).mean(axis=1)
            cache[key] = _normalize(per_label)
        return cache[key]

    def classify(self, images=None, labels=None, templates=None, embeddings=None):
        """Zero-shot classification: the label whose captions are most similar to each image.

        Args:
            images: images for the image encoder, or their `encode_images` representations (or None with
                `embeddings`).
            labels: list of str class names.
            templates: None (labels as captions), "en", "en-short", "it", "it-short", a template string
                with "{}", a callable, or a list of those.
            embeddings: optional precomputed image embeddings (n, D).

        Returns:
            A `Classification` (labels with "unknown" where the best score <= `unknown_threshold`).
        """
        if labels is None:
            raise ValueError("classify() needs labels=[...]")
        scores = self.similarity(self.encode_images(images, embeddings), self.class_representations(labels, templates))
        return self._decide(scores, _as_labels(labels))

    def _decide(self, scores, labels):
        best = scores.argmax(axis=1)
        confident = scores[np.arange(len(scores)), best] > self.unknown_threshold
        indices = np.where(confident, best, -1)
        names = [labels[i] if i >= 0 else UNKNOWN for i in indices]
        return Classification(names, scores, indices.astype(np.int64))

    def calibrate(self, true_labels, labels, images=None, templates=None, embeddings=None, target_error=0.05):
        """Picks `unknown_threshold` so that at most `target_error` of the queries are answered wrongly.

        The lowest such threshold is chosen (answering as many queries as the error budget allows). The
        paper's ImageNet triple (accuracy 0.495, unknown 0.297, wrong 0.208) is this report.

        Args:
            true_labels: the right label per query (str, or int index into `labels`).
            labels: list of str class names.
            images / embeddings: the calibration queries (held out from anything being evaluated), as in
                `classify`.
            templates: as in `classify`.
            target_error: float in [0, 1], largest fraction of wrong answers.

        Returns:
            {"threshold", "accuracy", "unknown", "wrong"} at the chosen threshold (fractions of all
            queries); the model's `unknown_threshold` is set to it.
        """
        labels = _as_labels(labels)
        truth = _label_indices(true_labels, labels)
        scores = self.similarity(self.encode_images(images, embeddings), self.class_representations(labels, templates))
        best = scores.max(axis=1)
        right = scores.argmax(axis=1) == truth
        # Thresholds between consecutive distinct scores: answering the queries scored above t.
        candidates = np.unique(np.concatenate([[0.0], best]))
        wrong_rate = np.array([np.mean((best > t) & ~right) for t in candidates])
        threshold = float(candidates[np.flatnonzero(wrong_rate <= target_error)[0]])
        self.unknown_threshold = threshold
        return dict(threshold=threshold, **unknown_report(scores, truth, threshold))

    def retrieve(self, queries, gallery, top_k=10):
        """The `top_k` gallery items most similar to each query.

        Args:
            queries: a `RelativeRepresentation` (from `encode_images` or `encode_texts`).
            gallery: a `RelativeRepresentation` of the other modality.
            top_k: int.

        Returns:
            (indices int64 (Q, top_k), scores float32 (Q, top_k)), best first.
        """
        scores = sparse_inner(queries, gallery)
        top_k = min(int(top_k), scores.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
        return order, np.take_along_axis(scores, order, axis=1)

    def explain(self, image=None, label=None, templates=None, embedding=None, top=10):
        """The anchor pairs behind the score of `image` for `label`, heaviest first.

        Each shared anchor contributes image weight x label weight to the score; the contributions sum
        to `classify(...).scores` for that label.

        Args:
            image: one image (or None with `embedding`).
            label: str.
            templates: as in `classify`.
            embedding: optional precomputed image embedding (D,) or (1, D).
            top: number of pairs returned (None for all shared anchors).

        Returns:
            A list of dicts {"id", "caption", "image_ref", "weight", "image_weight", "text_weight"}.
        """
        if embedding is None:
            embedding = self.image_encoder.embed([image] if not _is_batch(image) else image)
        image_rep = self.encode_images(embeddings=np.reshape(embedding, (1, -1)))
        class_rep = self.class_representations([label], templates)
        shared, image_at, class_at = np.intersect1d(image_rep.indices[0], class_rep.indices[0], return_indices=True)
        image_weight = image_rep.values[0, image_at]
        text_weight = class_rep.values[0, class_at]
        weight = image_weight * text_weight
        order = np.argsort(-weight, kind="stable")[: None if top is None else int(top)]
        ids, captions, refs = self.collection.ids, self.collection.captions, self.collection.image_refs
        return [
            {
                "id": ids[shared[i]],
                "caption": captions[shared[i]],
                "image_ref": refs[shared[i]],
                "weight": float(weight[i]),
                "image_weight": float(image_weight[i]),
                "text_weight": float(text_weight[i]),
            }
            for i in order
            if weight[i] > 0
        ]

    def fine_prune(self, labels, m, templates=None):
        """A sub-collection of the `m` anchors that matter most for a label set.

        An anchor matters for a label set when it carries weight in some label's representation; the
        anchors are ranked by their largest weight over the labels. Using the result (`use(...)`) makes
        the model smaller and faster for these labels only.

        Args:
            labels: list of str class names.
            m: int, anchors kept.
            templates: as in `classify`.

        Returns:
            A new `AnalogyCollection` (the model's own collection is unchanged).
        """
        collection = self._require_collection()
        rep = self.class_representations(labels, templates)
        importance = np.zeros(len(collection), np.float32)
        np.maximum.at(importance, rep.indices.ravel(), rep.values.ravel())
        keep = np.sort(np.argsort(-importance, kind="stable")[: int(m)])
        return _subset(collection, keep, f"{collection.name}-pruned-{int(m)}")

    # === Saving ===

    def get_config(self):
        config = super().get_config()
        config.update(
            image_encoder=keras.layers.serialize(self.image_encoder),
            text_encoder=keras.layers.serialize(self.text_encoder),
            k=self.k,
            p=self.p,
            anchor_dtype=self.anchor_dtype,
            unknown_threshold=self.unknown_threshold,
            keep_collections=self.keep_collections,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["image_encoder"] = keras.layers.deserialize(config["image_encoder"])
        config["text_encoder"] = keras.layers.deserialize(config["text_encoder"])
        return cls(**config)

    def save_assets(self, dir_path):
        """Writes the collection as .npy arrays and JSON (never pickle) next to the weights."""
        if self.collection is None:
            return
        save_collection_arrays(self.collection, dir_path)

    def load_assets(self, dir_path):
        """Restores the collection written by `save_assets`."""
        if os.path.exists(os.path.join(dir_path, "collection.json")):
            self._current = self._kept.get(load_collection_arrays(dir_path), self.keep_collections)


class _Derived:
    """What a model derives from one collection: its anchor indexes and class representations."""

    def __init__(self, collection):
        self.collection = collection
        self.indexes = {}  # kind -> (collection version, AnchorIndex)
        self.classes = {}  # (labels, templates) -> (collection version, RelativeRepresentation)


class _Kept:
    """The derived states of the collections a model used or prepared last (least recent first)."""

    def __init__(self):
        self._states = _collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, collection, limit, keep=None):
        """The state of `collection` (new if not kept), now the most recent; drops the oldest over `limit`.

        The state of `keep` (the current collection, when preparing another) is never dropped, so
        the current collection's indexes stay kept. A dropped state lives on while a query holds it.
        """
        with self._lock:
            derived = self._states.pop(collection.uid, None) or _Derived(collection)
            self._states[collection.uid] = derived
            for uid in list(self._states)[:-1]:
                if len(self._states) <= limit:
                    break
                if keep is None or uid != keep.uid:
                    del self._states[uid]
            return derived


def relative_representation(index, embeddings, k, p, version, collection=None):
    """ASIF's sparse relative representations of `embeddings` against the anchors of `index`.

    Each row keeps its `k` largest similarities to the anchors (negatives clipped to 0), raised to the
    power `p` and L2-normalised. `ASIF.relative` calls it on the model's current index; a server that
    keeps its own snapshots of indexes calls it on theirs, so both compute the same thing.

    Args:
        index: an `AnchorIndex`.
        embeddings: float (n, D) embeddings (L2-normalised here).
        k: int, anchors kept per row (at most the index size).
        p: float, exponent.
        version: the collection version the index reflects (recorded in the result).
        collection: the collection's `uid`, or None.

    Returns:
        A `RelativeRepresentation`.

    Example:
    >>> from keras_clip_it.search import AnchorIndex
    >>> index = AnchorIndex(np.eye(3, dtype="float32"))
    >>> rep = relative_representation(index, np.array([[1.0, 1.0, 0.0]]), k=2, p=1.0, version=0)
    >>> rep.indices.tolist(), [round(float(v), 3) for v in rep.values[0]]
    ([[0, 1]], [0.707, 0.707])
    """
    similarities, rows = index.topk(_normalize(embeddings), min(int(k), index.size))
    weights = np.maximum(similarities, 0.0) ** p
    norms = np.linalg.norm(weights, axis=1, keepdims=True)
    weights = np.where(norms > 0, weights / np.maximum(norms, 1e-30), 0.0).astype(np.float32)
    return RelativeRepresentation(rows, weights, index.size, version, collection)


def sparse_inner(left, right):
    """(len(left) x len(right)) inner products of two batches of sparse representations.

    An inverted index over `right` (entries sorted by anchor) finds, for each entry of `left`, the
    entries of `right` on the same anchor; the products are summed per (left row, right row). Work and
    memory grow with the number of matching entries, never with N.
    """
    right_rows = np.repeat(np.arange(len(right)), right.indices.shape[1])
    right_anchors = right.indices.ravel()
    order = np.argsort(right_anchors, kind="stable")
    right_anchors, right_rows, right_values = right_anchors[order], right_rows[order], right.values.ravel()[order]
    out = np.zeros(len(left) * len(right), np.float64)
    left_anchors = left.indices.ravel()
    left_values = left.values.ravel()
    left_rows = np.repeat(np.arange(len(left)), left.indices.shape[1])
    starts = np.searchsorted(right_anchors, left_anchors, side="left")
    counts = np.searchsorted(right_anchors, left_anchors, side="right") - starts
    ends = np.cumsum(counts)
    begin = 0
    while begin < len(left_anchors):
        # Entries [begin, stop) of `left` match at most _JOIN_CHUNK entries of `right` together.
        limit = (ends[begin] - counts[begin]) + _JOIN_CHUNK
        stop = max(begin + 1, int(np.searchsorted(ends, limit, side="right")))
        chunk_counts = counts[begin:stop]
        entry = np.repeat(np.arange(begin, stop), chunk_counts)
        first = np.cumsum(chunk_counts) - chunk_counts
        position = starts[entry] + np.arange(len(entry)) - np.repeat(first, chunk_counts)
        target = left_rows[entry] * len(right) + right_rows[position]
        out += np.bincount(target, weights=left_values[entry] * right_values[position], minlength=out.size)
        begin = stop
    return out.reshape(len(left), len(right)).astype(np.float32)


def unknown_report(scores, truth, threshold):
    """{"accuracy", "unknown", "wrong"}: fractions of queries answered right, abstained, answered wrong."""
    best = scores.max(axis=1)
    answered = best > threshold
    right = scores.argmax(axis=1) == np.asarray(truth)
    return {
        "accuracy": float(np.mean(answered & right)),
        "unknown": float(np.mean(~answered)),
        "wrong": float(np.mean(answered & ~right)),
    }


def save_collection_arrays(collection, dir_path):
    """Writes `collection` to a directory: collection.json, rows.jsonl and one .npy per encoder."""
    arrays = []
    for kind, fingerprints in collection.fingerprints.items():
        for number, fingerprint in enumerate(fingerprints):
            name = f"{kind}_{number}.npy"
            np.save(os.path.join(dir_path, name), np.asarray(collection.embeddings(kind, fingerprint)))
            arrays.append({"kind": kind, "fingerprint": fingerprint, "file": name})
    with open(os.path.join(dir_path, "rows.jsonl"), "w", encoding="utf-8") as f:
        for row in zip(collection.ids, collection.captions, collection.image_refs, collection.metadata):
            f.write(json.dumps(dict(zip(("id", "caption", "image_ref", "metadata"), row)), ensure_ascii=False) + "\n")
    manifest = {"name": collection.name, "language": collection.language, "pairs": len(collection), "arrays": arrays}
    with open(os.path.join(dir_path, "collection.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)


def load_collection_arrays(dir_path):
    """Reads a collection written by `save_collection_arrays`."""
    with open(os.path.join(dir_path, "collection.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    with open(os.path.join(dir_path, "rows.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    embeddings = {}
    for entry in manifest["arrays"]:
        array = np.load(os.path.join(dir_path, entry["file"]), allow_pickle=False)
        embeddings.setdefault(entry["kind"], {})[entry["fingerprint"]] = array
    collection = AnalogyCollection(name=manifest["name"], language=manifest["language"])
    collection.add(
        [r["id"] for r in rows],
        captions=[r["caption"] for r in rows],
        image_refs=[r["image_ref"] for r in rows],
        metadata=[r["metadata"] for r in rows],
        embeddings=embeddings,
    )
    return collection


def _subset(collection, rows, name):
    subset = AnalogyCollection(name=name, language=collection.language)
    pick = lambda values: [values[i] for i in rows]  # noqa: E731
    embeddings = {}
    for kind, fingerprints in collection.fingerprints.items():
        for fingerprint in fingerprints:
            embeddings.setdefault(kind, {})[fingerprint] = collection.embeddings(kind, fingerprint)[rows]
    subset.add(
        pick(collection.ids),
        captions=pick(collection.captions),
        image_refs=pick(collection.image_refs),
        metadata=pick(collection.metadata),
        embeddings=embeddings,
    )
    return subset


def _normalize(embeddings):
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (n, D), got shape {embeddings.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", embeddings, embeddings))
    if norms.size and float(np.abs(norms - 1.0).max()) <= 1e-6:
        return embeddings  # unit rows already (what the encoders return): no copy
    return embeddings / np.maximum(norms, 1e-12)[:, None]


def _as_labels(labels):
    if isinstance(labels, str):
        raise TypeError(f"labels must be a list of class names, got the single string {labels!r}")
    labels = [str(label) for label in labels]
    if not labels:
        raise ValueError("labels is empty")
    return labels


def _label_indices(true_labels, labels):
    positions = {label: i for i, label in enumerate(labels)}
    out = []
    for value in true_labels:
        if isinstance(value, (int, np.integer)):
            out.append(int(value))
        elif str(value) in positions:
            out.append(positions[str(value)])
        else:
            raise ValueError(f"true label {value!r} is not one of the labels {labels[:10]}")
    return np.asarray(out, np.int64)


def _templates_key(templates):
    if templates is None or isinstance(templates, str):
        return templates
    if callable(templates):
        return id(templates)
    return tuple(t if isinstance(t, str) else id(t) for t in templates)


def _is_batch(images):
    if isinstance(images, np.ndarray):
        return images.ndim == 4
    return isinstance(images, (list, tuple))


def _as_mesh(mesh):
    if mesh is None:
        return None
    import jax

    if isinstance(mesh, str):
        if mesh != "auto":
            raise ValueError(f"mesh must be None, 'auto', a jax.sharding.Mesh or a keras DeviceMesh, got {mesh!r}")
        return jax.sharding.Mesh(np.array(jax.devices()), ("anchors",))
    if isinstance(mesh, keras.distribution.DeviceMesh):
        from keras.src.backend.jax import distribution_lib

        mesh = distribution_lib._to_backend_mesh(mesh)
    if not isinstance(mesh, jax.sharding.Mesh) or len(mesh.axis_names) != 1:
        raise ValueError("mesh must have exactly one axis (the anchors are split along it)")
    return mesh

