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
import json
import os
import threading

import keras
import numpy as np

from keras_clip_it.collections.analogy_collection import AnalogyCollection
from keras_clip_it.collections.storage import open_collection
from keras_clip_it.collections.storage import save_collection
from keras_clip_it.models.asif_state import Anchors
from keras_clip_it.models.asif_state import ASIFState
from keras_clip_it.models.asif_state import LabelEmbeddings
from keras_clip_it.models.asif_state import RelativeRepresentation
from keras_clip_it.models.asif_state import checked_pooling
from keras_clip_it.models.asif_state import normalize
from keras_clip_it.models.asif_state import unknown_report
from keras_clip_it.models.asif_tuning import KS as TUNED_KS
from keras_clip_it.models.asif_tuning import PS as TUNED_PS
from keras_clip_it.models.asif_tuning import tune_settings


# Next to the saved collection: the centres of a centred model's two sides (JSON lists of floats).
_CENTERS = "asif_centers.json"


@keras.saving.register_keras_serializable(package="keras_clip_it")
class ASIF(keras.Model):
    """A training-free image-text model over an analogy collection.

    A query image is compared with the N collection images; its k largest cosine similarities
    (negatives clipped to 0), raised to the power p and L2-normalised, form a sparse N-dimensional
    relative representation. A text is compared with the N captions in the same way. Since row i of
    both sides is the same pair, image-text similarity is the inner product of the two representations.

    Every answer is computed on one published `ASIFState` (`snapshot()`): the collection at one version,
    its anchor indexes, k, p and the unknown threshold. `use`, `add`, `remove`, `prepare`, `calibrate` and
    setting `k`, `p` or `unknown_threshold` build a new state and publish it with one assignment, so a
    query running meanwhile sees the old state or the new one, never a mix; `add` and `remove` cost
    O(pairs changed). The search is exact at any scale (`AnchorIndex`: bfloat16 screening with a certified
    error bound, then float32 rescoring), memory-bounded, and optionally sharded over devices. Anchors can
    be stored in float16 or int8 (per-row scales).

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
        label_pooling: how a label scores from its template captions: "max" (each caption represented,
            the label scores by its best one, as the ASIF authors do), "mean" (the captions' scores
            averaged) or "average" (the captions' embeddings averaged, then represented, as CLIP's
            prompt ensembling). Part of the published state, so the server and the export follow it.
        center: bool; subtract each side's anchor mean from its anchors, queries and labels and
            normalise again (see `Anchors`): flat relative representations of anisotropic encoders
            (multilingual-e5) become sharp. Saved with the model.
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
        label_pooling="average",
        center=True,
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
        if anchor_dtype not in ("float32", "float16", "int8"):
            raise ValueError(f"anchor_dtype must be 'float32', 'float16' or 'int8', got {anchor_dtype!r}")
        if int(keep_collections) < 1:
            raise ValueError(f"keep_collections must be a positive integer, got {keep_collections}")
        self._anchor_dtype = anchor_dtype
        self._mesh = _as_mesh(mesh)
        self._keep_collections = int(keep_collections)
        self._center = bool(center)
        # Changes are serialised; queries never wait for them (they read the published state).
        self._write_lock = threading.RLock()
        self._kept = _Kept()
        self._published = ASIFState(
            0, None, _checked_k(k), _checked_p(p), float(unknown_threshold), LabelEmbeddings(text_encoder.embed),
            checked_pooling(label_pooling),
        )
        if collection is not None:
            self.use(collection)
        self.built = True

    # === Settings (part of the published state) ===

    @property
    def k(self):
        """int, anchors kept per representation. Setting it publishes a new state."""
        return self._published.k

    @k.setter
    def k(self, value):
        self._publish(k=_checked_k(value))

    @property
    def p(self):
        """float, exponent of the kept similarities. Setting it publishes a new state."""
        return self._published.p

    @p.setter
    def p(self, value):
        self._publish(p=_checked_p(value))

    @property
    def label_pooling(self):
        """How a label scores from its template captions ("average", "max", "mean").

        Setting it publishes a new state.
        """
        return self._published.label_pooling

    @label_pooling.setter
    def label_pooling(self, value):
        self._publish(label_pooling=checked_pooling(value))

    @property
    def center(self):
        """bool, whether each side is centred on its anchors' mean. Setting it publishes a new state."""
        return self._center

    @center.setter
    def center(self, value):
        with self._write_lock:
            self._center = bool(value)
            state = self.snapshot()
            if state.anchors is not None:
                self._publish(anchors=self._new_anchors(state.collection))

    @property
    def unknown_threshold(self):
        """float, the best score at or below which `classify` says "unknown" (see `calibrate`)."""
        return self._published.unknown_threshold

    @unknown_threshold.setter
    def unknown_threshold(self, value):
        self._publish(unknown_threshold=float(value))

    @property
    def anchor_dtype(self):
        """How anchors are stored for search: "float32", "float16" or "int8"."""
        return self._anchor_dtype

    @property
    def mesh(self):
        """The one-axis `jax.sharding.Mesh` the anchors are spread over, or None."""
        return self._mesh

    @property
    def keep_collections(self):
        """Collections whose indexes are kept for swapping back (the current one included)."""
        return self._keep_collections

    # === The published state ===

    def snapshot(self):
        """The published `ASIFState`: compute several answers on it to have them agree on one collection version.

        When the collection was changed directly (`collection.add(...)` rather than `asif.add(...)`), the
        state follows the change first, in O(pairs changed).

        Example:
        >>> state = asif.snapshot()  # doctest: +SKIP
        >>> images = state.relative(image_encoder.embed(photos), "image")  # doctest: +SKIP
        >>> state.classify(images, ["gatto", "cane"], templates="it").labels  # doctest: +SKIP
        """
        state = self._published
        if state.anchors is not None and not state.anchors.current:
            with self._write_lock:
                state = self._published
                if state.anchors is not None and not state.anchors.current:
                    state = self._publish(anchors=state.anchors.followed(state.k))
        return state

    def _publish(self, anchors=None, **settings):
        """Publishes a new state with these anchors and settings (the others from the current state)."""
        with self._write_lock:
            state = self._published
            anchors = state.anchors if anchors is None else anchors
            names = ("k", "p", "unknown_threshold", "label_pooling")
            settings = {name: settings.get(name, getattr(state, name)) for name in names}
            if anchors is not None:
                self._kept.keep(anchors, self._keep_collections)
            self._published = ASIFState(state.version + 1, anchors, labels=state.labels, **settings)
            return self._published

    def replica(self):
        """A new ASIF with this one's encoders and settings, and no collection.

        The server answers from a replica, so that what clients add, remove and activate never changes the
        model (or the collections) it was given.
        """
        return ASIF(
            self.image_encoder,
            self.text_encoder,
            k=self.k,
            p=self.p,
            label_pooling=self.label_pooling,
            center=self._center,
            anchor_dtype=self._anchor_dtype,
            unknown_threshold=self.unknown_threshold,
            mesh=self._mesh,
            keep_collections=self._keep_collections,
        )

    # === Collection ===

    @property
    def collection(self):
        """The current `AnalogyCollection` (None before `use` or `add`)."""
        return self.snapshot().collection

    def use(self, collection):
        """Makes `collection` the model's anchors (embedding what it lacks with this model's encoders).

        O(1) for a collection used or prepared recently (see `keep_collections`): its indexes are
        published with it, and queries running meanwhile see the old or the new collection, never a mix.

        Args:
            collection: an `AnalogyCollection`, a registered name ("emoji-it") or an fsspec URI.
        """
        with self._write_lock:
            self._publish(anchors=self._anchors_of(collection))

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
        with self._write_lock:
            anchors = self._anchors_of(collection).warm(self.k)
            current = self._published.anchors
            self._kept.keep(anchors, self._keep_collections, current=None if current is None else current.collection)
            return anchors.collection

    def _anchors_of(self, collection):
        """The `Anchors` of `collection` (resolved, embedded for this model's encoders) at its current version."""
        if isinstance(collection, (str, os.PathLike)):
            from keras_clip_it import collections

            collection = collections.load(collection)
        if not isinstance(collection, AnalogyCollection):
            raise TypeError(f"use() takes an AnalogyCollection, a name or a URI, got {type(collection).__name__}")
        kept = self._kept.find(collection)
        if kept is not None and kept.centered == self._center:
            return kept.followed(self.k)
        fingerprints = self._fingerprints()  # read once: some encoders rehash their weights on every read
        if len(collection):
            missing = {
                f"{kind}_encoder": getattr(self, f"{kind}_encoder")
                for kind, fingerprint in fingerprints.items()
                if not collection.has_embeddings(kind, fingerprint)
            }
            collection.embed(**missing)
        return self._new_anchors(collection, fingerprints)

    def _new_anchors(self, collection, fingerprints=None, centers=None):
        fingerprints = self._fingerprints() if fingerprints is None else fingerprints
        return Anchors(collection, fingerprints, self._anchor_dtype, self._mesh, centered=self._center, centers=centers)

    def _fingerprints(self):
        return {"image": self.image_encoder.fingerprint, "text": self.text_encoder.fingerprint}

    def add(self, ids, images=None, captions=None, image_embeddings=None, text_embeddings=None, **kwargs):
        """Adds pairs to the collection (a new in-memory one if the model has none); O(pairs added).

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
        with self._write_lock:
            anchors = self.snapshot().anchors
            if anchors is None:
                anchors = self._new_anchors(AnalogyCollection(name="asif"))
            anchors.collection.add(
                ids,
                captions=captions,
                embeddings={
                    "image": {anchors.fingerprints["image"]: normalize(image_embeddings)},
                    "text": {anchors.fingerprints["text"]: normalize(text_embeddings)},
                },
                **kwargs,
            )
            self._publish(anchors=anchors.followed(self.k))

    def remove(self, ids):
        """Removes the pairs with these ids from the collection; O(pairs removed)."""
        with self._write_lock:
            anchors = self._require_state().anchors
            anchors.collection.remove(ids)
            self._publish(anchors=anchors.followed(self.k))

    def _require_state(self):
        state = self.snapshot()
        if not state.pairs:
            raise ValueError("this ASIF model has no anchors yet: call use(collection) or add(ids, ...) first")
        return state

    def index(self, kind):
        """The anchor index over the collection's `kind` ("image"/"text") embeddings, kept up to date.

        After `add` / `remove` (here or on the collection) the index follows the recorded changes in
        O(pairs changed); it is built from scratch only for a collection the model has not kept (see
        `keep_collections`). Each update makes a new index and publishes it with a new state, so
        concurrent queries use the old or the new one.
        """
        return self._require_state().index(kind)

    # === Representations ===

    def relative(self, embeddings, kind):
        """Relative representations of L2-normalised `embeddings` (n, D) against the `kind` anchors."""
        return self._require_state().relative(embeddings, kind)

    def encode_images(self, images=None, embeddings=None):
        """Sparse relative representations of images (or of their precomputed `embeddings`).

        A `RelativeRepresentation` passes through unchanged, so `classify` and `calibrate` can reuse the
        representations of queries scored several times.
        """
        return self._image_representations(self._require_state(), images, embeddings)

    def _image_representations(self, state, images, embeddings):
        if isinstance(images, RelativeRepresentation):
            return images
        if embeddings is None:
            embeddings = self.image_encoder.embed(images)
        return state.relative(embeddings, "image")

    def encode_texts(self, texts=None, embeddings=None):
        """Sparse relative representations of texts (or of their precomputed `embeddings`)."""
        if embeddings is None:
            embeddings = self.text_encoder.embed(list(texts) if not isinstance(texts, str) else [texts])
        return self.relative(embeddings, "text")

    def similarity(self, image_representations, text_representations):
        """(images x texts) float32 inner products of two batches of relative representations."""
        return self._require_state().similarity(image_representations, text_representations)

    # === Tasks ===

    def class_representations(self, labels, templates=None):
        """Relative representations of the labels' captions: one row per label with "average" pooling,
        one per caption (label c's T captions in rows c * T to (c + 1) * T - 1) with "max" or "mean".

        Kept on the published state: repeated `classify` calls with the same labels embed nothing, and any
        change of the collection, k, p or pooling represents them again.
        """
        return self._require_state().class_representations(labels, templates)

    def class_scores(self, images=None, labels=None, templates=None, embeddings=None, pooling=None):
        """(Q, C) float32 scores of images (or their representations) for each label, pooled over captions
        by `label_pooling` (or `pooling`)."""
        state = self._require_state()
        return state.class_scores(self._image_representations(state, images, embeddings), labels, templates, pooling=pooling)

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
        state = self._require_state()
        return state.classify(self._image_representations(state, images, embeddings), labels, templates)

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
        state = self._require_state()
        labels = list(labels)
        truth = _label_indices(true_labels, labels)
        scores = state.class_scores(self._image_representations(state, images, embeddings), labels, templates)
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
        return self._require_state().retrieve(queries, gallery, top_k)

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
        state = self._require_state()
        return state.explain(state.relative(np.reshape(embedding, (1, -1)), "image"), label, templates, top)

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
        state = self._require_state()
        rep = state.class_representations(labels, templates)
        importance = np.zeros(state.pairs, np.float32)
        np.maximum.at(importance, rep.indices.ravel(), rep.values.ravel())
        keep = np.sort(np.argsort(-importance, kind="stable")[: int(m)])
        return state.collection.copy(rows=keep, name=f"{state.name}-pruned-{int(m)}")

    def tune(self, ks=None, ps=None, centers=(True, False), held_out=0.2, max_queries=1000, seed=0):
        """Picks k, p and centring from the collection alone, and publishes them.

        Part of the collection's pairs (`held_out`, at most `max_queries`) are held out and retrieved
        both ways (image -> its caption, caption -> its image) with the rest as anchors; the setting with
        the best mean R@1 is chosen (deterministic for a collection and `seed`). Best suited to
        collections of distinct captions: where captions repeat (a class name in a few templates), a
        pair's own caption is one of many equal ones and the score says little.

        Returns:
            `asif.tuning`: {"tried": [...], "chosen": {...}, "pairs", "queries"}.
        """
        report = tune_settings(self, ks or TUNED_KS, ps or TUNED_PS, centers, held_out, max_queries, seed)
        chosen = report["chosen"]
        with self._write_lock:
            self.center = chosen["center"]
            self._publish(k=_checked_k(chosen["k"]), p=_checked_p(chosen["p"]))
        self._tuning = report
        return report

    @property
    def tuning(self):
        """What the last `tune()` tried and chose (None before any)."""
        return getattr(self, "_tuning", None)

    # === Saving ===

    def get_config(self):
        config = super().get_config()
        config.update(
            image_encoder=keras.layers.serialize(self.image_encoder),
            text_encoder=keras.layers.serialize(self.text_encoder),
            k=self.k,
            p=self.p,
            label_pooling=self.label_pooling,
            center=self.center,
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
        """Writes the collection next to the weights in the collection store's format (arrays as .npy and
        JSON, checksummed; never pickle), this model's embeddings only."""
        state = self.snapshot()
        if state.collection is not None:
            save_collection(state.collection.copy(fingerprints=state.anchors.fingerprints), dir_path)
            if state.pairs and state.anchors.centered:
                # The centres the indexes were built on, so the reloaded model answers as this one.
                centers = {kind: state.anchors.center(kind).tolist() for kind in ("image", "text")}
                with open(os.path.join(dir_path, _CENTERS), "w") as f:
                    json.dump(centers, f)

    def load_assets(self, dir_path):
        """Restores the collection written by `save_assets`, into memory (the asset files are temporary)."""
        if os.path.isdir(dir_path) and os.listdir(dir_path):
            collection = open_collection(dir_path).copy()
            # The saved embeddings are this model's own (see save_assets). The encoders' weights may not be
            # loaded yet, so their fingerprints are read from what was saved, not computed now.
            fingerprints = {kind: found[0] for kind, found in collection.fingerprints.items() if found}
            centers = None
            if os.path.exists(os.path.join(dir_path, _CENTERS)):
                with open(os.path.join(dir_path, _CENTERS)) as f:
                    centers = {kind: np.asarray(c, np.float32) for kind, c in json.load(f).items()}
            with self._write_lock:
                self._publish(anchors=self._new_anchors(collection, fingerprints, centers))


class _Kept:
    """The `Anchors` of the collections a model used or prepared last (least recent first), by collection."""

    def __init__(self):
        self._anchors = _collections.OrderedDict()
        self._lock = threading.Lock()

    def find(self, collection):
        with self._lock:
            return self._anchors.get(collection.uid)

    def keep(self, anchors, limit, current=None):
        """Keeps `anchors` as the most recent; drops the oldest over `limit`, never `current`'s (a
        collection) nor the one just kept. A dropped state lives on while a query holds it."""
        uid = anchors.collection.uid
        with self._lock:
            self._anchors.pop(uid, None)
            self._anchors[uid] = anchors
            for old in list(self._anchors)[:-1]:
                if len(self._anchors) <= limit:
                    break
                if current is None or old != current.uid:
                    del self._anchors[old]


def _checked_k(k):
    if int(k) < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    return int(k)


def _checked_p(p):
    if not float(p) > 0:
        raise ValueError(f"p must be positive, got {p}")
    return float(p)


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
