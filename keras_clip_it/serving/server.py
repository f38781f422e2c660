"""The HTTP server: embed, classify and retrieve with an ASIF or a DualEncoder, and swap ASIF collections live.

`create_app(model)` returns a FastAPI application; `keras-clip-it serve` runs it with uvicorn.

Three properties shape the code:

- **One collection per answer, changes in O(change).** An ASIF collection changes while clients classify
  (pairs added or removed, another collection activated). A request never reads the collection: it
  reads a *snapshot*, published with one assignment, that holds the anchor indexes of one collection
  version (`AnchorIndex`es are never changed once built: a change makes new ones that share the old
  ones' stored anchors). A change edits the server's own copy of the active collection in place
  (`AnalogyCollection.add`/`remove` cost O(pairs changed)), brings the indexes to the new version with
  `follow` (O(pairs changed) too) and publishes the new snapshot; requests in flight keep the old
  indexes. A request takes the current snapshot once and computes everything on it; its answer names
  the snapshot's version. Only activating another collection builds indexes from scratch (O(N)).
- **Bad input is a 4xx, never a 5xx.** Bodies are bounded before parsing, every field is bounded in the
  schema (batch, label and caption sizes), images are checked against a pixel limit from their header
  before any pixel is decoded, embeddings must be finite, non-zero and of the model's dimension, and
  every error is JSON naming what was wrong. Nothing is ever unpickled.
- **Concurrent clients share the encoders.** Requests run in a thread pool; encoder calls go through one
  worker per encoder that takes every request waiting at that moment and runs them as one batch
  (micro-batching without a timer: a lone client waits for nobody, and under load a batch forms while
  the previous one runs). The image and text workers run at the same time (each encoder orders its own
  predictions), so embedding new labels never stalls the images of other requests.
"""

import base64
import binascii
import dataclasses
import functools
import io
import re
import threading
from collections import OrderedDict
from collections import deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Annotated
from typing import Literal
from typing import Optional
from typing import Union

import numpy as np
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import StringConstraints
from pydantic import AfterValidator
from pydantic import model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from keras_clip_it.collections.analogy_collection import AnalogyCollection
from keras_clip_it.data.images import ImageDecodeError
from keras_clip_it.data.images import to_rgb_array
from keras_clip_it.encoders.base import l2_normalize
from keras_clip_it.encoders.base import padded_batch_size
from keras_clip_it.models.asif import UNKNOWN
from keras_clip_it.models.asif import relative_representation
from keras_clip_it.models.asif import sparse_inner
from keras_clip_it.search import AnchorIndex
from keras_clip_it.search import follow
from keras_clip_it.templates import fill

_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,")
_LABEL_CACHE_SIZE = 256
# Labels x anchors up to which a cached label set also keeps its relative representation dense (1 MiB):
# a query's scores are then one gather, where the sparse join sorts the labels' entries on every call.
_DENSE_LABELS = 2**18


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; anything beyond is refused with a 4xx.

    Args:
        body_bytes: largest request body (413 beyond).
        image_pixels: largest width x height of one image, read from its header before decoding (413).
        batch: images, texts or embeddings per request (queries and gallery each).
        pairs: pairs per add or remove request.
        labels: labels per classify request.
        templates: templates per classify request.
        captions: labels x templates per classify request (each is a text to embed).
        text_chars: characters of one text, caption, label, template, id or collection name.
        embedding_dim: largest length of one embedding in the schema (the model's own is enforced too).
    """

    body_bytes: int = 16 * 2**20
    image_pixels: int = 16_000_000
    batch: int = 64
    pairs: int = 1024
    labels: int = 512
    templates: int = 100
    captions: int = 4096
    text_chars: int = 2000
    embedding_dim: int = 4096


class ApiError(Exception):
    """A request the server refuses: an HTTP status, a short type and a message saying what to do."""

    def __init__(self, status, kind, message):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One published state of the served model: what every answer is computed on.

    Nothing a snapshot holds changes after it is published, so a request that took it computes on one
    collection version from start to end, whatever changes are published meanwhile.

    Attributes:
        version: int, grows by one on every change of the active collection (0: no collection; None for
            a DualEncoder).
        name: the active collection's name, or None.
        pairs: int, the number of pairs in the collection at this version.
        indexes: {"image": AnchorIndex, "text": AnchorIndex} over the collection at this version, or
            None when there are no anchors.
        k: int, anchors per ASIF representation (from the served model when the snapshot was published).
        p: float, the ASIF exponent.
        unknown_threshold: float, the best score at or below which a classification is "unknown".
    """

    version: Optional[int]
    name: Optional[str]
    pairs: int = 0
    indexes: Optional[dict] = None
    k: int = 0
    p: float = 1.0
    unknown_threshold: float = -np.inf

    def info(self):
        return {"name": self.name, "version": self.version, "pairs": self.pairs}

    def relative(self, embeddings, kind):
        """ASIF's relative representations of unit `embeddings` (n, D) against this version's `kind` anchors.

        The same computation as `ASIF.relative`, on this snapshot's index instead of the model's current one.
        """
        return relative_representation(self.indexes[kind], embeddings, self.k, self.p, self.version)


class _Batcher:
    """Runs `function(items) -> rows` for concurrent callers, batching whatever is waiting together.

    Each of `workers` threads takes the waiting jobs in order while they fit in `max_items` (a single
    job larger than that runs alone), runs them as one call and hands each caller its rows. There is no
    timer: a single client is never delayed, and under load the next batch fills while the current one
    runs. With two workers, two batches run at once, which fills the cores that one call leaves idle
    (small convolutions do not split over threads); the encoder orders the calls itself where its
    backend needs it.

    The encoders pad every batch to a power of two up to their batch size (`padded_batch_size`), and a
    padded row costs as much as a real one, so a worker takes the longest run of waiting jobs that
    fills such a size exactly and leaves the rest to the next free worker: three waiting images run as
    two and one, not as four with one of padding.
    """

    def __init__(self, function, max_items, workers=1):
        self._function = function
        self.max_items = int(max_items)
        if self.max_items < 1:
            raise ValueError(f"encoder_batch must be a positive integer, got {max_items}")
        self.workers = int(workers)
        if self.workers < 1:
            raise ValueError(f"encoder_workers must be a positive integer, got {workers}")
        self._jobs = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._threads = []
        self._start_lock = threading.Lock()

    def __call__(self, items):
        if not len(items):
            raise ValueError("nothing to embed")
        self._start()
        future = Future()
        with self._ready:
            self._jobs.append((items, future))
            self._ready.notify()
        return future.result()

    def _start(self):
        with self._start_lock:
            while len(self._threads) < self.workers:
                thread = threading.Thread(target=self._run, name="kci-batcher", daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self):
        """Runs the jobs already waiting, then ends the workers (a later call starts them again)."""
        with self._start_lock:
            with self._ready:
                self._stopping = True
                self._ready.notify_all()
            for thread in self._threads:
                thread.join()
            self._threads = []
            self._stopping = False

    def _take(self):
        """The next batch of jobs, or None when stopping with nothing left to run."""
        with self._ready:
            while not self._jobs:
                if self._stopping:
                    return None
                self._ready.wait()
            count, fits, exact = 0, 0, 1
            for items, _ in self._jobs:
                if fits and count + len(items) > self.max_items:
                    break
                count, fits = count + len(items), fits + 1
                if padded_batch_size(count, self.max_items) == count:
                    exact = fits
            batch = [self._jobs.popleft() for _ in range(exact)]
            if self._jobs:
                self._ready.notify()  # another worker may take what is left
            return batch

    def _run(self):
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                rows = self._function([item for items, _ in jobs for item in items])
            except Exception as error:  # hand the error to every caller of the batch
                for _, future in jobs:
                    future.set_exception(error)
                continue
            start = 0
            for items, future in jobs:
                future.set_result(rows[start : start + len(items)])
                start += len(items)


def _holding(lock, function):
    def run(*args, **kwargs):
        with lock:
            return function(*args, **kwargs)

    return run


class Service:
    """The served model, its published snapshot, the registered collections and the encoder batchers.

    Reads (`embed`, `classify`, `retrieve`) take the current snapshot once; changes (`activate`, `add`,
    `remove`) are serialised by a lock, edit the server's own copy of the collection, bring its anchor
    indexes up to date and publish a new snapshot with one assignment.

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
        self.is_asif = hasattr(model, "relative") and hasattr(model, "text_encoder")
        if not self.is_asif and not hasattr(model, "encode_images"):
            raise TypeError(f"create_app serves a kci.ASIF or a kci.DualEncoder, got {type(model).__name__}")
        self.model = model
        self._prepare_image = model.image_encoder.preprocess
        self._write_lock = threading.Lock()
        self._label_lock = threading.Lock()
        self._labels = OrderedDict()
        self._registered = {}
        # The collection the current snapshot's indexes were built on, and its version then.
        self._indexed = (None, None)
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
            self._embed_images = _Batcher(embed_images, encoder_batch, encoder_workers)
            self._embed_texts = _Batcher(model.text_encoder.embed, encoder_batch, encoder_workers)
            for collection in collections or ():
                self._register(self._load(collection, trusted=True) if isinstance(collection, str) else collection)
            self.snapshot = Snapshot(0, None)
            if model.collection is not None:
                self._publish(self._register(model.collection))
        else:
            if collections:
                raise ValueError("a DualEncoder has no analogy collection: pass collections= only with an ASIF")
            self.image_dim = self.text_dim = int(model.projection_dim)
            # Both towers belong to one Keras model, whose predictions must not overlap (on JAX they
            # replace its weight arrays).
            lock = threading.Lock()
            encode_images = functools.partial(model.encode_images, batch_size=int(encoder_batch))
            self._embed_images = _Batcher(_holding(lock, encode_images), encoder_batch)
            self._embed_texts = _Batcher(_holding(lock, model.encode_texts), encoder_batch)
            self.snapshot = Snapshot(None, None)

    @property
    def collection(self):
        """The server's own copy of the active collection (it changes with every add and remove), or None."""
        return self._indexed[0]

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
        classes = self._labels_entry(labels, templates)
        if self.is_asif:
            relative = snapshot.relative(queries, "image")
            labels_relative, dense = self._class_relative(snapshot, classes)
            if dense is None:
                scores = sparse_inner(relative, labels_relative)
            else:
                scores = np.einsum("cqk,qk->qc", dense[:, relative.indices], relative.values)
            threshold = snapshot.unknown_threshold
        else:
            scores, threshold = queries @ classes["embeddings"].T, -np.inf
        best = scores.argmax(axis=1)
        predictions = []
        for row, index in zip(scores, best):
            confident = row[index] > threshold
            predictions.append(
                {
                    "label": labels[index] if confident else UNKNOWN,
                    "index": int(index) if confident else -1,
                    "scores": [float(value) for value in row],
                }
            )
        return {"labels": labels, "predictions": predictions, "collection": snapshot.info()}

    def retrieve(self, queries, gallery, top_k):
        snapshot = self._readable()
        query_rows = self._rows(queries, "queries")
        gallery_rows = self._rows(gallery, "gallery")
        if self.is_asif:
            scores = sparse_inner(snapshot.relative(*query_rows), snapshot.relative(*gallery_rows))
        else:
            scores = query_rows[0] @ gallery_rows[0].T
        top_k = min(int(top_k), scores.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
        matches = [[{"index": int(j), "score": float(row[j])} for j in picks] for row, picks in zip(scores, order)]
        return {"matches": matches, "collection": snapshot.info()}

    def _readable(self):
        snapshot = self.snapshot
        if self.is_asif and snapshot.indexes is None:
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

    def _labels_entry(self, labels, templates):
        """The cache entry of a label set: {"embeddings": unit (C, D), "relative": (version, representation,
        dense representation or None)}.

        Label embeddings (templates averaged) never depend on a collection and are kept across versions;
        their relative representation is kept for the last snapshot version it was computed on. Requests
        that bring the same new label set at once wait for one embedding instead of each running it.
        """
        key = (tuple(labels), templates if not isinstance(templates, list) else tuple(templates))
        with self._label_lock:
            cached = self._labels.get(key)
            if cached is not None:
                self._labels.move_to_end(key)
            else:
                self._labels[key] = pending = Future()
                while len(self._labels) > _LABEL_CACHE_SIZE:
                    self._labels.popitem(last=False)
        if cached is not None:
            return cached.result() if isinstance(cached, Future) else cached
        try:
            entry = {"embeddings": self._embed_labels(labels, templates), "relative": None}
        except BaseException as error:
            with self._label_lock:
                if self._labels.get(key) is pending:
                    del self._labels[key]
            pending.set_exception(error)
            raise
        with self._label_lock:
            if self._labels.get(key) is pending:
                self._labels[key] = entry
        pending.set_result(entry)
        return entry

    def _embed_labels(self, labels, templates):
        try:
            captions = [fill(templates, label) for label in labels]
        except (ValueError, TypeError, IndexError, KeyError) as error:
            raise ApiError(422, "invalid_templates", f"templates: {error}") from None
        per_label = len(captions[0])
        if per_label * len(labels) > self.limits.captions:
            raise ApiError(
                413,
                "too_many_captions",
                f"{len(labels)} labels x {per_label} templates = {per_label * len(labels)} captions, more than "
                f"the limit of {self.limits.captions}: use fewer labels or a shorter template set (e.g. 'it-short')",
            )
        flat = self._embed_texts([caption for group in captions for caption in group])
        return l2_normalize(flat.reshape(len(labels), per_label, -1).mean(axis=1))

    @staticmethod
    def _class_relative(snapshot, entry):
        """The label set's relative representation on `snapshot`, and the same as a dense (C, N) array
        when it is small (else None)."""
        cached = entry["relative"]  # one read: another thread may replace it meanwhile
        if cached is None or cached[0] != snapshot.version:
            relative = snapshot.relative(entry["embeddings"], "text")
            dense = None
            if len(relative) * relative.num_anchors <= _DENSE_LABELS:
                dense = np.zeros((len(relative), relative.num_anchors), np.float32)
                np.put_along_axis(dense, relative.indices, relative.values, axis=1)
            cached = (snapshot.version, relative, dense)
            entry["relative"] = cached
        return cached[1], cached[2]

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
            return self._publish(collection)

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
            collection = self.collection
            if collection is None:
                collection = self._register(AnalogyCollection(name="default"))
            try:
                collection.add(
                    ids,
                    captions=captions,
                    embeddings={
                        "image": {self.fingerprints["image"]: image_rows},
                        "text": {self.fingerprints["text"]: text_rows},
                    },
                )
            except ValueError as error:
                raise ApiError(409, "duplicate_ids", str(error)) from None
            return self._publish(collection)

    def remove(self, ids):
        self._require_asif()
        with self._write_lock:
            collection = self.collection
            if collection is None:
                raise ApiError(409, "no_collection", "no collection is active: there is nothing to remove")
            try:
                collection.remove(ids)
            except KeyError as error:
                raise ApiError(404, "unknown_ids", str(error.args[0])) from None
            return self._publish(collection)

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
        copy = AnalogyCollection(name=collection.name, language=collection.language)
        if len(collection):
            copy.add(
                collection.ids,
                captions=collection.captions,
                image_refs=collection.image_refs,
                metadata=collection.metadata,
                embeddings={kind: {fp: collection.embeddings(kind, fp)} for kind, fp in self.fingerprints.items()},
            )
        self._registered[copy.name] = copy
        return copy

    def _publish(self, collection):
        """Brings the anchor indexes to `collection`'s current state and publishes them (under the lock).

        The indexes of the active collection follow its recorded changes in O(pairs changed); another
        collection (or one whose changes are no longer recorded) gets new indexes, compiled here by one
        query so that no client pays for it.
        """
        model = self.model
        with collection.lock:  # its state does not change while the indexes catch up
            indexes = None
            if len(collection):
                indexes = {}
                previous, version = self._indexed
                for kind, fingerprint in self.fingerprints.items():
                    old = self.snapshot.indexes[kind] if previous is collection and self.snapshot.indexes else None
                    index = None if old is None else follow(old, collection, kind, fingerprint, version)
                    if index is None or index.block != old.block:  # a new layout compiles its scan once
                        index = index or AnchorIndex(
                            collection.embeddings(kind, fingerprint), dtype=model.anchor_dtype, mesh=model.mesh
                        )
                        index.topk(np.ones((1, index.dim), np.float32), min(model.k, index.size))
                    indexes[kind] = index
            self._indexed = (collection, collection.version)
            self.snapshot = Snapshot(
                self.snapshot.version + 1,
                collection.name,
                len(collection),
                indexes,
                k=model.k,
                p=model.p,
                unknown_threshold=model.unknown_threshold,
            )
        return {"collection": self.snapshot.info()}


# === Schemas ===


def _schemas(limits):
    """The request and response models, with the limits written into the OpenAPI schema."""
    Text = Annotated[str, StringConstraints(max_length=limits.text_chars), AfterValidator(_utf8)]
    Name = Annotated[str, StringConstraints(min_length=1, max_length=limits.text_chars), AfterValidator(_utf8)]
    Image64 = Annotated[
        str,
        StringConstraints(min_length=1, max_length=limits.body_bytes),
        Field(description="an image file (JPEG, PNG, GIF, BMP, WebP) base64-encoded, optionally as a data: URL"),
    ]
    Value = Annotated[float, Field(allow_inf_nan=False)]
    Vector = Annotated[list[Value], Field(min_length=1, max_length=limits.embedding_dim)]

    def items(kind, length):
        return Optional[Annotated[list[kind], Field(min_length=1, max_length=length)]]

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Inputs(Strict):
        """Exactly one of: images, texts, image_embeddings, text_embeddings."""

        images: items(Image64, limits.batch) = None
        texts: items(Text, limits.batch) = None
        image_embeddings: items(Vector, limits.batch) = None
        text_embeddings: items(Vector, limits.batch) = None

        @model_validator(mode="after")
        def _one(self):
            given = [
                f for f in ("images", "texts", "image_embeddings", "text_embeddings") if getattr(self, f) is not None
            ]
            if len(given) != 1:
                raise ValueError(f"give exactly one of images, texts, image_embeddings, text_embeddings (got {given})")
            return self

    class EmbedRequest(Strict):
        """Images or texts to embed with the model's encoders."""

        images: items(Image64, limits.batch) = None
        texts: items(Text, limits.batch) = None

        @model_validator(mode="after")
        def _one(self):
            if (self.images is None) == (self.texts is None):
                raise ValueError("give exactly one of images or texts")
            return self

    class ClassifyRequest(Strict):
        """Images (or their embeddings) to classify among labels, captioned through templates."""

        labels: Annotated[list[Name], Field(min_length=1, max_length=limits.labels)]
        templates: Optional[Union[Text, Annotated[list[Text], Field(min_length=1, max_length=limits.templates)]]] = (
            Field(
                None,
                description="None (labels as captions), a set ('en', 'en-short', 'it', 'it-short'), a template with "
                "'{}', or a list of templates",
            )
        )
        images: items(Image64, limits.batch) = None
        image_embeddings: items(Vector, limits.batch) = None

        @model_validator(mode="after")
        def _one(self):
            if (self.images is None) == (self.image_embeddings is None):
                raise ValueError("give exactly one of images or image_embeddings")
            return self

    class RetrieveRequest(Strict):
        """For each query, the most similar gallery items (any modality on either side)."""

        queries: Inputs
        gallery: Inputs
        top_k: Annotated[int, Field(ge=1, le=limits.batch)] = 10

    class ActivateRequest(Strict):
        """A registered or installed collection name (or a URI when the server allows them)."""

        name: Name

    class AddRequest(Strict):
        """Pairs to add to the active collection: ids, captions, and images or image embeddings."""

        ids: Annotated[list[Name], Field(min_length=1, max_length=limits.pairs)]
        captions: Annotated[list[Text], Field(min_length=1, max_length=limits.pairs)]
        images: items(Image64, limits.batch) = None
        image_embeddings: items(Vector, limits.pairs) = None
        text_embeddings: items(Vector, limits.pairs) = Field(None, description="the captions' embeddings, if known")

        @model_validator(mode="after")
        def _one(self):
            if (self.images is None) == (self.image_embeddings is None):
                raise ValueError("give exactly one of images or image_embeddings")
            return self

    class RemoveRequest(Strict):
        """Ids of pairs to remove from the active collection."""

        ids: Annotated[list[Name], Field(min_length=1, max_length=limits.pairs)]

    class CollectionInfo(BaseModel):
        """The collection an answer was computed on (all None/0 for a DualEncoder)."""

        name: Optional[str]
        version: Optional[int]
        pairs: int

    class Health(BaseModel):
        status: Literal["ok"]
        model: str
        collection: CollectionInfo

    class EmbedResponse(BaseModel):
        kind: Literal["image", "text"]
        dim: int
        embeddings: list[list[float]]
        collection: CollectionInfo

    class Prediction(BaseModel):
        label: str = Field(description="the best label, or 'unknown' when the evidence is too weak")
        index: int = Field(description="index of the label, -1 for 'unknown'")
        scores: list[float] = Field(description="score of each label, aligned with labels")

    class ClassifyResponse(BaseModel):
        labels: list[str]
        predictions: list[Prediction]
        collection: CollectionInfo

    class Match(BaseModel):
        index: int
        score: float

    class RetrieveResponse(BaseModel):
        matches: list[list[Match]]
        collection: CollectionInfo

    class Registered(BaseModel):
        name: str
        language: str
        pairs: int

    class CollectionsResponse(BaseModel):
        active: CollectionInfo
        registered: list[Registered]
        available: list[str]
        uris_allowed: bool

    class ChangeResponse(BaseModel):
        collection: CollectionInfo

    return dict(locals())


def _utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the string holds unpaired surrogates (\\ud800-\\udfff), which are not text") from None
    return text


class ErrorBody(BaseModel):
    """Every error: what kind, what was wrong and what to do, and field details for validation errors."""

    error: str
    type: str
    details: Optional[list[dict]] = None


def _error(status, kind, message, details=None):
    body = {"error": message, "type": kind}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status)


class _BodyGuard:
    """ASGI middleware: refuses bodies over the limit (413) and non-JSON bodies (415) before parsing."""

    def __init__(self, app, max_bytes):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        too_large = _error(
            413, "body_too_large", f"the request body is larger than {self.max_bytes:,} bytes: send less per request"
        )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if body and not (content_type == b"application/json" or content_type.endswith(b"+json")):
            shown = content_type.decode("latin-1") or "none"
            error = _error(
                415, "unsupported_media_type", f"the body must be JSON (Content-Type: application/json), got {shown}"
            )
            return await error(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def create_app(
    model, collections=(), limits=None, allow_uris=False, encoder_batch=4, encoder_workers=1, warm_up=False
):
    """A FastAPI application serving `model` over HTTP: /v1/embed, /v1/classify, /v1/retrieve, /v1/collections.

    Every answer names the collection version it was computed on; collection changes (activate, add,
    remove) are published atomically, so concurrent requests each see one consistent collection. Bad
    requests get a 4xx JSON error `{"error", "type", "details"}`; OpenAPI schema at /openapi.json, docs at
    /docs. Run it with uvicorn (`keras-clip-it serve` does).

    Args:
        model: a `kci.ASIF` (with or without a collection) or a `kci.DualEncoder`.
        collections: optional iterable of `AnalogyCollection`s or collection names (ASIF only) that clients
            may activate by name, besides the model's own collection and the installed plugins' ones.
        limits: a `Limits` (defaults: 16 MiB bodies, 16M-pixel images, 64 items per request...).
        allow_uris: bool; when True, clients may activate collections stored at URIs or paths on the
            server's file systems (keep it off for servers reachable by untrusted clients).
        encoder_batch: int, most images (or texts) one encoder call gathers from concurrent requests;
            1 turns micro-batching off. A batch costs less per image than single images
            (benchmarks/results/serve_stages.md), but batch 8 left 8 clients no faster than 4
            (docs/serving.md).
        encoder_workers: int, encoder calls that may run at once (each a batch).
        warm_up: bool; compile the image tower for every batch size before serving (slower start, no
            compilation pauses later).

    Returns:
        A `fastapi.FastAPI` application; its `state.service` is the `Service`.

    Example:
    >>> import uvicorn, keras_clip_it as kci
    >>> asif = kci.ASIF(kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet"),
    ...                 kci.TextEncoder.from_preset("multilingual_e5_small"), collection="emoji-it")
    >>> app = kci.serving.create_app(asif)
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    limits = limits or Limits()
    service = Service(
        model,
        collections=collections,
        limits=limits,
        allow_uris=allow_uris,
        encoder_batch=encoder_batch,
        encoder_workers=encoder_workers,
    )
    if warm_up:
        service.warm_up()
    s = _schemas(limits)
    errors = {status: {"model": ErrorBody} for status in (400, 403, 404, 409, 413, 415, 422)}

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.stop()

    app = FastAPI(
        title="keras-clip-it",
        description="Image-text embedding, zero-shot classification and retrieval with ASIF or a dual encoder.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(_BodyGuard, max_bytes=limits.body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request, error):
        return _error(error.status, error.kind, error.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, error):
        details = [
            {
                "loc": [str(part) for part in item.get("loc", ())],
                "msg": str(item.get("msg", "")),
                "type": str(item.get("type", "")),
            }
            for item in error.errors()[:20]
        ]
        where = "; ".join(f"{'.'.join(d['loc'][1:]) or 'body'}: {d['msg']}" for d in details[:3])
        return _error(422, "invalid_request", f"the request does not match the schema ({where}); see /docs", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, error):
        if error.status_code == 400:  # FastAPI could not parse the body (invalid UTF-8, nesting too deep)
            return _error(400, "invalid_json", f"{error.detail}: send UTF-8 JSON of reasonable depth")
        return _error(error.status_code, "http_error", str(error.detail))

    @app.get("/health", response_model=s["Health"], tags=["service"])
    def health():
        """Liveness, the model type and the active collection."""
        return service.health()

    @app.post("/v1/embed", response_model=s["EmbedResponse"], responses=errors, tags=["inference"])
    def embed(request: s["EmbedRequest"]):
        """Unit-norm embeddings of images or texts by the model's encoders (reusable as precomputed embeddings)."""
        return service.embed(images=request.images, texts=request.texts)

    @app.post("/v1/classify", response_model=s["ClassifyResponse"], responses=errors, tags=["inference"])
    def classify(request: s["ClassifyRequest"]):
        """Zero-shot classification of images among labels ('unknown' when an ASIF is unsure)."""
        return service.classify(request.labels, request.templates, request.images, request.image_embeddings)

    @app.post("/v1/retrieve", response_model=s["RetrieveResponse"], responses=errors, tags=["inference"])
    def retrieve(request: s["RetrieveRequest"]):
        """For each query, the indices and scores of the `top_k` most similar gallery items."""
        return service.retrieve(request.queries, request.gallery, request.top_k)

    @app.get("/v1/collections", response_model=s["CollectionsResponse"], tags=["collections"])
    def list_collections():
        """The active collection, the collections loaded on this server and those installed plugins offer."""
        return service.collections()

    @app.post("/v1/collections/activate", response_model=s["ChangeResponse"], responses=errors, tags=["collections"])
    def activate(request: s["ActivateRequest"]):
        """Makes a collection the active one (loading and embedding it on first use)."""
        return service.activate(request.name)

    @app.post("/v1/collections/pairs", response_model=s["ChangeResponse"], responses=errors, tags=["collections"])
    def add_pairs(request: s["AddRequest"]):
        """Adds pairs to the active collection (a new one named 'default' if none is active)."""
        return service.add(
            request.ids, request.captions, request.images, request.image_embeddings, request.text_embeddings
        )

    @app.post("/v1/collections/remove", response_model=s["ChangeResponse"], responses=errors, tags=["collections"])
    def remove_pairs(request: s["RemoveRequest"]):
        """Removes pairs by id from the active collection."""
        return service.remove(request.ids)

    return app
