"""The served model behind the HTTP routes: decoding, limits, batching, errors and locks around one ASIF state.

Three properties shape it:

- **One state per answer, changes in O(change).** The server answers from its own ASIF replica (same
  encoders and settings as the model it was given, see `ASIF.replica`), so what clients change never
  reaches the caller's model or collections. A request takes the replica's published `ASIFState` once
  and computes everything on it; its answer names that state's version. Activating, adding and removing
  go through the replica (`use`, `add`, `remove`), which follows the change in O(pairs changed) and
  publishes a new state with one assignment; requests in flight keep the old one. The server edits its
  own in-memory copy of each collection it registers.
- **Bad input is a 4xx, never a 5xx.** Bodies are bounded before parsing, every field is bounded in the
  schema (batch, label and caption sizes), images are checked against a pixel limit from their header
  before any pixel is decoded, embeddings must be finite, non-zero and of the model's dimension, and
  every error is JSON naming what was wrong. Nothing is ever unpickled.
- **Concurrent clients share the encoders.** Requests run in a thread pool; encoder calls go through one
  `Batcher` per encoder, which runs every request waiting at that moment as one batch. The image and text
  workers run at the same time, so embedding new labels never stalls the images of other requests.
"""

import base64
import binascii
import dataclasses
import functools
import io
import re
import threading
from typing import Optional

import numpy as np
from PIL import Image

from keras_clip_it.collections.analogy_collection import AnalogyCollection
from keras_clip_it.data.images import ImageDecodeError
from keras_clip_it.data.images import to_rgb_array
from keras_clip_it.models.asif_state import UNKNOWN
from keras_clip_it.models.asif_state import LabelEmbeddings
from keras_clip_it.serving.batcher import Batcher
from keras_clip_it.serving.batcher import holding
from keras_clip_it.serving.errors import ApiError
from keras_clip_it.serving.schemas import Limits
from keras_clip_it.templates import average
from keras_clip_it.templates import fill

_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,")


@dataclasses.dataclass(frozen=True)
class NoCollection:
    """What a DualEncoder's answers are computed on: no collection (the ASIF counterpart is `ASIFState`)."""

    version: Optional[int] = None
    name: Optional[str] = None
    pairs: int = 0

    def info(self):
        return {"name": self.name, "version": self.version, "pairs": self.pairs}


class Service:
    """The served model, its published state, the registered collections and the encoder batchers.

    Reads (`embed`, `classify`, `retrieve`) take the current state once; changes (`activate`, `add`,
    `remove`) are serialised by a lock and go through the server's ASIF replica, which publishes a new
    state.

    Args:
        model: a `kci.ASIF` or a `kci.DualEncoder`.
        collections: optional iterable of `AnalogyCollection`s (or registered names / URIs) clients may
            activate by name, in addition to the model's own and the installed plugins' collections.
            The server keeps its own copies: it never edits the collections (or the model) it is given.
        limits: a `Limits`.
        allow_uris: whether clients may activate collections by URI or path (off: only names).
        encoder_batch: most images or texts one encoder call takes from concurrent requests (1: no
            micro-batching).
        encoder_workers: encoder calls that may run at once per encoder.
    """

    def __init__(self, model, collections=(), limits=None, allow_uris=False, encoder_batch=4, encoder_workers=1):
        self.limits = limits or Limits()
        self.allow_uris = bool(allow_uris)
        self.is_asif = hasattr(model, "snapshot") and hasattr(model, "text_encoder")
        if not self.is_asif and not hasattr(model, "encode_images"):
            raise TypeError(f"create_app serves a kci.ASIF or a kci.DualEncoder, got {type(model).__name__}")
        self.model = model
        self._prepare_image = model.image_encoder.preprocess
        self._write_lock = threading.Lock()
        self._registered = {}
        if self.is_asif:
            self.image_dim = model.image_encoder.embedding_dim
            self.text_dim = model.text_encoder.embedding_dim
            # Read once: an encoder with trainable weights on TensorFlow or torch rehashes all of them on
            # every read (seconds for multilingual-e5-small), and changes must cost O(pairs changed).
            self.fingerprints = {"image": model.image_encoder.fingerprint, "text": model.text_encoder.fingerprint}
            # Each encoder orders its own predictions, so the two workers need no common lock.
            # Images run in batches of at most encoder_batch, the sizes warm_up compiles, however many a
            # request brings.
            embed_images = functools.partial(model.image_encoder.embed, batch_size=int(encoder_batch))
            self._embed_images = Batcher(embed_images, encoder_batch, encoder_workers)
            self._embed_texts = Batcher(model.text_encoder.embed, encoder_batch, encoder_workers)
            self.asif = model.replica()
            for collection in collections or ():
                self._register(self._load(collection, trusted=True) if isinstance(collection, str) else collection)
            if model.collection is not None:
                self._activate(self._register(model.collection))
        else:
            if collections:
                raise ValueError("a DualEncoder has no analogy collection: pass collections= only with an ASIF")
            self.image_dim = self.text_dim = int(model.projection_dim)
            # Both towers belong to one Keras model, whose predictions must not overlap (on JAX they
            # replace its weight arrays).
            lock = threading.Lock()
            encode_images = functools.partial(model.encode_images, batch_size=int(encoder_batch))
            self._embed_images = Batcher(holding(lock, encode_images), encoder_batch)
            self._embed_texts = Batcher(holding(lock, model.encode_texts), encoder_batch)
            self._label_embeddings = LabelEmbeddings(model.encode_texts)

    @property
    def snapshot(self):
        """The state answers are computed on now: the replica's `ASIFState`, or `NoCollection`."""
        return self.asif.snapshot() if self.is_asif else NoCollection()

    @property
    def collection(self):
        """The server's own copy of the active collection (it changes with every add and remove), or None."""
        return self.snapshot.collection if self.is_asif else None

    def warm_up(self):
        """Compiles the image tower for every batch size micro-batching can form, so no client pays for it."""
        size = 1
        while True:
            self._embed_images([np.zeros((8, 8, 3), np.uint8)] * size)
            if size >= self._embed_images.max_items:
                return
            size = min(2 * size, self._embed_images.max_items)

    def stop(self):
        self._embed_images.stop()
        self._embed_texts.stop()

    def stop(self):
        self._embed_images.stop()
        self._embed_texts.stop()

    # === Reads ===

    def health(self):
        return {"status": "ok", "model": type(self.model).__name__, "collection": self.snapshot.info()}

    def embed(self, images=None, texts=None):
        snapshot = self.snapshot
        if images is not None:
            kind, rows = "image", self._embed_images(self.decode_images(images, "images"))
        else:
            kind, rows = "text", self._embed_texts(texts)
        return {"kind": kind, "dim": int(rows.shape[1]), "embeddings": rows.tolist(), "collection": snapshot.info()}

    def classify(self, labels, templates=None, images=None, image_embeddings=None):
        snapshot = self._readable()
        labels = list(labels)
        if len(set(labels)) != len(labels):
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            raise ApiError(422, "invalid_labels", f"labels repeat: {repeated[:10]}; give each class once")
        queries = self._image_rows(images, image_embeddings, "images", "image_embeddings")
        self._check_prompts(labels, templates)
        if self.is_asif:
            answer = snapshot.classify(snapshot.relative(queries, "image"), labels, templates, self._embed_texts)
            scores, indices = answer.scores, answer.indices
        else:
            # A dual encoder averages its captions' embeddings (CLIP's prompt ensembling).
            label_embeddings = average(self._label_embeddings.get(labels, templates, None, self._embed_texts))
            scores = queries @ label_embeddings.T
            indices = scores.argmax(axis=1)
        predictions = [
            {
                "label": labels[index] if index >= 0 else UNKNOWN,
                "index": int(index),
                "scores": [float(value) for value in row],
            }
            for row, index in zip(scores, indices)
        ]
        return {"labels": labels, "predictions": predictions, "collection": snapshot.info()}

    def retrieve(self, queries, gallery, top_k):
        snapshot = self._readable()
        query_rows = self._rows(queries, "queries")
        gallery_rows = self._rows(gallery, "gallery")
        if self.is_asif:
            order, scores = snapshot.retrieve(snapshot.relative(*query_rows), snapshot.relative(*gallery_rows), top_k)
        else:
            similarities = query_rows[0] @ gallery_rows[0].T
            order = np.argsort(-similarities, axis=1, kind="stable")[:, : min(int(top_k), similarities.shape[1])]
            scores = np.take_along_axis(similarities, order, axis=1)
        matches = [
            [{"index": int(j), "score": float(s)} for j, s in zip(picks, values)] for picks, values in zip(order, scores)
        ]
        return {"matches": matches, "collection": snapshot.info()}

    def _readable(self):
        snapshot = self.snapshot
        if self.is_asif and not snapshot.pairs:
            raise ApiError(
                409,
                "no_collection",
                "the ASIF model has no anchors yet: activate a collection (POST /v1/collections/activate) "
                "or add pairs (POST /v1/collections/pairs)",
            )
        return snapshot

    def _rows(self, inputs, where):
        """(embeddings, kind) of a retrieve side: images, texts or precomputed embeddings of either."""
        if inputs.images is not None or inputs.image_embeddings is not None:
            rows = self._image_rows(
                inputs.images, inputs.image_embeddings, f"{where}.images", f"{where}.image_embeddings"
            )
            return rows, "image"
        if inputs.texts is not None:
            return self._embed_texts(inputs.texts), "text"
        return self._check_embeddings(inputs.text_embeddings, self.text_dim, f"{where}.text_embeddings"), "text"

    def _image_rows(self, images, embeddings, images_field, embeddings_field):
        if images is not None:
            return self._embed_images(self.decode_images(images, images_field))
        return self._check_embeddings(embeddings, self.image_dim, embeddings_field)

    def _check_prompts(self, labels, templates):
        """Refuses templates that do not fill and label sets that would embed more captions than allowed."""
        try:
            captions = sum(len(fill(templates, label)) for label in labels)
        except (ValueError, TypeError, IndexError, KeyError) as error:
            raise ApiError(422, "invalid_templates", f"templates: {error}") from None
        if captions > self.limits.captions:
            raise ApiError(
                413,
                "too_many_captions",
                f"{len(labels)} labels x {captions // len(labels)} templates = {captions} captions, more than "
                f"the limit of {self.limits.captions}: use fewer labels or a shorter template set (e.g. 'it-short')",
            )

    def decode_images(self, images, field):
        """Base64 strings -> the image tower's uint8 inputs (H, W, 3), refusing bombs before decoding.

        Decoding and resizing run here, in the request's thread, so concurrent requests prepare their
        images side by side (PIL releases the GIL) and the encoder workers only stack and predict.
        """
        arrays = []
        for index, text in enumerate(images):
            where = f"{field}[{index}]"
            try:
                data = base64.b64decode(_DATA_URL.sub("", text, count=1), validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(
                    422, "invalid_base64", f"{where} is not valid base64: send the file's bytes base64-encoded"
                ) from None
            if not data:
                raise ApiError(422, "empty_image", f"{where} is empty (0 bytes): send a complete image file")
            try:
                with Image.open(io.BytesIO(data)) as header:
                    width, height = header.size
            except Image.DecompressionBombError:
                raise ApiError(
                    413, "image_too_large", f"{where} claims too many pixels to decode safely: resize it"
                ) from None
            except Exception as error:  # any failure to parse untrusted bytes is the client's bad image
                raise ApiError(
                    422,
                    "invalid_image",
                    f"{where} is not a readable image ({error}): send a JPEG, PNG, GIF, BMP or WebP",
                ) from None
            if width * height > self.limits.image_pixels:
                raise ApiError(
                    413,
                    "image_too_large",
                    f"{where} is {width}x{height} pixels, more than the limit of {self.limits.image_pixels:,}: "
                    "resize it before sending",
                )
            try:
                arrays.append(self._prepare_image(to_rgb_array(data, index))[0])
            except ImageDecodeError as error:
                raise ApiError(422, "invalid_image", f"{where}: {error}") from None
            except Exception as error:  # a decoder failing in a way images.py does not name
                raise ApiError(422, "invalid_image", f"{where} could not be decoded ({error}): re-export it") from None
        return arrays

    def _check_embeddings(self, rows, dim, field):
        lengths = {len(row) for row in rows}
        if lengths != {dim}:
            raise ApiError(
                422,
                "wrong_dimension",
                f"{field} rows have {sorted(lengths)[:5]} values, this model's embeddings have {dim}: send "
                "embeddings from the same encoder (POST /v1/embed returns them)",
            )
        array = np.asarray(rows, np.float64)
        if not np.all(np.abs(array) <= np.finfo(np.float32).max):
            raise ApiError(422, "not_finite", f"{field} holds values too large for float32: send unit-norm rows")
        array = array.astype(np.float32)
        norms = np.linalg.norm(array, axis=1)
        if np.any(norms == 0):
            raise ApiError(
                422, "zero_embedding", f"{field} row {int(np.argmin(norms))} is all zeros: it has no direction"
            )
        return array / norms[:, None]

    # === Collections ===

    def collections(self):
        from keras_clip_it import collections as registry

        try:
            available = registry.available()
        except Exception:  # a broken plugin environment must not break the listing of what is loaded
            available = []
        registered = [
            {"name": name, "language": col.language, "pairs": len(col)}
            for name, col in sorted(self._registered.items())
        ]
        return {
            "active": self.snapshot.info(),
            "registered": registered,
            "available": available,
            "uris_allowed": self.allow_uris,
        }

    def activate(self, name):
        self._require_asif()
        with self._write_lock:
            collection = self._registered.get(name)
            if collection is None:
                collection = self._register(self._load(name))
            return self._activate(collection)

    def _activate(self, collection):
        """Publishes `collection` with both anchor indexes built and compiled, so that no client pays for them."""
        self.asif.prepare(collection)
        self.asif.use(collection)
        return {"collection": self.snapshot.info()}

    def add(self, ids, captions, images=None, image_embeddings=None, text_embeddings=None):
        self._require_asif()
        for field, values in (
            ("captions", captions),
            ("image rows", images or image_embeddings),
            ("text_embeddings", text_embeddings),
        ):
            if values is not None and len(values) != len(ids):
                raise ApiError(422, "misaligned", f"{len(values)} {field} for {len(ids)} ids: send one per id")
        image_rows = self._image_rows(images, image_embeddings, "images", "image_embeddings")
        if text_embeddings is None:
            text_rows = self._embed_texts(captions)
        else:
            text_rows = self._check_embeddings(text_embeddings, self.text_dim, "text_embeddings")
        with self._write_lock:
            try:
                if self.collection is not None:
                    self.asif.add(ids, captions=captions, image_embeddings=image_rows, text_embeddings=text_rows)
                    return self._published()
                # No collection yet: the pairs start a new one, published once, with them.
                collection = AnalogyCollection(name="default")
                collection.add(
                    ids,
                    captions=captions,
                    embeddings={"image": {self.fingerprints["image"]: image_rows}, "text": {self.fingerprints["text"]: text_rows}},
                )
            except ValueError as error:
                raise ApiError(409, "duplicate_ids", str(error)) from None
            self._registered[collection.name] = collection
            return self._activate(collection)

    def remove(self, ids):
        self._require_asif()
        with self._write_lock:
            if self.collection is None:
                raise ApiError(409, "no_collection", "no collection is active: there is nothing to remove")
            try:
                self.asif.remove(ids)
            except KeyError as error:
                raise ApiError(404, "unknown_ids", str(error.args[0])) from None
            return self._published()

    def _published(self):
        """Builds and compiles what the new state lacks (under the write lock, before the next change)."""
        snapshot = self.snapshot
        if snapshot.pairs:
            snapshot.anchors.warm(snapshot.k)
        return {"collection": snapshot.info()}

    def _require_asif(self):
        if not self.is_asif:
            raise ApiError(409, "no_collections", "this server runs a DualEncoder, which has no analogy collection")

    def _load(self, name, trusted=False):
        """Loads a collection by name (or URI: from the operator, or from clients if allowed)."""
        from keras_clip_it import collections as registry

        available = registry.available()
        if name not in available and not (self.allow_uris or trusted):
            if "://" in name or name.startswith((".", "/", "~")) or "\\" in name:
                raise ApiError(
                    403,
                    "uris_not_allowed",
                    f"{name!r} is a URI or path; this server activates collections by name only (start it with "
                    "--allow-uris to accept URIs)",
                )
            known = sorted(set(self._registered) | set(available))
            raise ApiError(404, "unknown_collection", f"no collection named {name!r}; available: {known}")
        try:
            return registry.load(name)
        except (LookupError, FileNotFoundError, ValueError, OSError) as error:
            raise ApiError(404, "unknown_collection", f"cannot open collection {name!r}: {error}") from None

    def _register(self, collection):
        """Registers the server's own copy of `collection` (embedded with this model's encoders) under its name.

        The copy holds this model's embeddings only, in memory, so the server may edit it in place: the
        given collection (a caller's object, or a read-only stored one) is never changed, except that
        embeddings it lacks for this model's encoders are computed once.
        """
        model = self.model
        missing = {
            f"{kind}_encoder": getattr(model, f"{kind}_encoder")
            for kind, fingerprint in self.fingerprints.items()
            if len(collection) and not collection.has_embeddings(kind, fingerprint)
        }
        if missing:
            collection.embed(**missing)
        if len(collection):
            copy = collection.copy(fingerprints=self.fingerprints)
        else:
            copy = AnalogyCollection(name=collection.name, language=collection.language)
        self._registered[copy.name] = copy
        return copy
