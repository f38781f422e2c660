"""What an ASIF model answers from: one immutable, published query state.

An `ASIFState` holds everything an answer depends on: the collection at one version, its anchor indexes,
k, p and the "unknown" threshold. `ASIF` builds a new state for every change (`use`, `add`, `remove`,
`prepare`, `calibrate`, a new k or p) and publishes it with one assignment; `ASIF.snapshot()` returns
the published one. Everything that answers queries (the model's own methods, the HTTP server, the
SavedModel export) computes on a state it took once, so a query never mixes two collection versions or
two settings, whatever is published meanwhile.

Nothing a state holds changes. Two things are filled in on first use and then kept, without changing
what the state means: the anchor index of each side (`Anchors`, built when first queried, since many
uses need one side only), and the representations of the label sets classified on this state (they
depend on the collection version, k and p, all fixed in the state, so a new state starts a new cache).
Label *embeddings* depend only on the labels, templates and text encoder: `LabelEmbeddings` keeps them
across states.
"""

import collections as _collections
import dataclasses
import threading
from concurrent.futures import Future

import numpy as np

from keras_clip_it.search import AnchorIndex
from keras_clip_it.search import follow
from keras_clip_it.templates import average
from keras_clip_it.templates import prompt_embeddings

UNKNOWN = "unknown"
# How a label scores from its template captions: "average" represents the mean of the captions'
# embeddings (CLIP's prompt ensembling); "max" and "mean" represent every caption and pool its scores
# (the ASIF authors' way: a label scores by its best caption).
POOLINGS = ("average", "max", "mean")
# A centred side keeps its centre until the collection's mean has moved by this fraction of the anchors'
# spread around it; then the side is centred again (its index rebuilt, see `Anchors.followed`).
_RECENTER = 0.05
# Bounds the temporary arrays of the sparse product (entries matched at once).
_JOIN_CHUNK = 4_000_000
# Labels x anchors up to which a label set's representation is also kept dense (1 MiB): a query's scores
# are then one gather, where the sparse join sorts the labels' entries on every call.
_DENSE_LABELS = 2**18
# Label sets whose embeddings are kept (least recently used dropped first).
_LABEL_SETS = 256


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


class StaleStateError(RuntimeError):
    """A state needed an index of a collection version that has changed since: take `asif.snapshot()` again."""


class Anchors:
    """The anchor indexes of one collection at one version: each side built on first use, then kept.

    Centring (`centered=True`): each side's anchors, and every query and label of that side, have the
    side's centre (the anchors' mean when the side was first indexed) subtracted and are normalised again.
    Encoders such as multilingual-e5 put all texts in a narrow cone (unrelated captions at cosine ~0.85),
    where top-k similarities are nearly flat; centring spreads them. The index searches the centred
    anchors, so the search stays exact for what is scored. The centre is fixed per side: changes append
    centred rows (O(pairs changed)), and only when the collection's running mean
    (`AnalogyCollection.embedding_mean`) has moved by `_RECENTER` of the spread is the side centred again
    and its index rebuilt, which happens after a fixed fraction of the collection has changed.

    Args:
        collection: the `AnalogyCollection`.
        fingerprints: {"image": fingerprint, "text": fingerprint} of the model's encoders (read once:
            some encoders rehash their weights on every read).
        dtype: how anchors are stored ("float32", "float16", "int8").
        mesh: None or a one-axis `jax.sharding.Mesh` the anchors are spread over.
        indexes: {kind: index} already brought to the collection's current version.
        centered: bool, centre each side (see above).
        centers: {kind: float32 (D,)} centres already fixed (from the previous version, or saved).
    """

    def __init__(
        self, collection, fingerprints, dtype="float32", mesh=None, indexes=None, centered=False, centers=None
    ):
        self.collection = collection
        self.version = collection.version
        self.size = len(collection)
        self.fingerprints = dict(fingerprints)
        self.dtype = dtype
        self.mesh = mesh
        self.centered = bool(centered)
        self._indexes = dict(indexes or {})
        self._centers = dict(centers or {}) if self.centered else {}
        self._lock = threading.Lock()

    @property
    def current(self):
        """Whether the collection is still at this version."""
        return self.collection.version == self.version

    @property
    def built(self):
        """{kind: index} of the sides built so far."""
        return dict(self._indexes)

    def index(self, kind):
        """The anchor index of `kind` ("image" / "text"), built now if this is its first use."""
        index = self._indexes.get(kind)
        if index is None:
            with self._lock, self.collection.lock:
                index = self._indexes.get(kind)
                if index is None:
                    if not self.current:
                        raise StaleStateError(
                            f"collection {self.collection.name!r} changed (version {self.version} -> "
                            f"{self.collection.version}) before its {kind} index was built: take asif.snapshot() "
                            "again and query that"
                        )
                    index = AnchorIndex(self._searched_rows(kind), dtype=self.dtype, mesh=self.mesh)
                    self._indexes[kind] = index
        return index

    def center(self, kind):
        """The float32 (D,) centre of `kind`'s side, or None when not centred (fixed by its index)."""
        if not self.centered:
            return None
        self.index(kind)
        return self._centers[kind]

    @property
    def centers(self):
        """{kind: centre} of the sides centred so far (what a saved model keeps)."""
        return dict(self._centers)

    def searched_rows(self, kind):
        """The (N, D) rows `kind`'s index searches, in collection order (centred when `centered`)."""
        with self.collection.lock:
            self.index(kind)
            return self._searched_rows(kind)

    def _searched_rows(self, kind):
        rows = self.collection.embeddings(kind, self.fingerprints[kind])
        if not self.centered:
            return rows
        if kind not in self._centers:
            self._centers[kind] = self.collection.embedding_mean(kind, self.fingerprints[kind])
        return center_rows(rows, self._centers[kind])

    def followed(self, k):
        """The anchors of the collection as it is now; O(pairs changed).

        The sides built so far follow the recorded changes (`follow`); a side whose changes are no longer
        recorded is built again on first use. A side whose layout changed compiles its scan here, with a
        query of `k` anchors, so that no later query pays for it.
        """
        collection = self.collection
        with collection.lock:
            if self.current:
                return self
            indexes, centers = {}, {}
            if len(collection):
                for kind, center in self._centers.items():
                    if not _moved(center, collection.embedding_mean(kind, self.fingerprints[kind])):
                        centers[kind] = center
                for kind, old in self.built.items():
                    if self.centered and kind not in centers:
                        continue  # centred again: rebuilt on first use
                    center = centers.get(kind)
                    transform = None if center is None else (lambda rows, center=center: center_rows(rows, center))
                    index = follow(old, collection, kind, self.fingerprints[kind], self.version, transform)
                    if index is not None:
                        if getattr(index, "block", None) != getattr(old, "block", None):
                            _compile(index, k)
                        indexes[kind] = index
                    elif center is not None:
                        del centers[kind]
            return Anchors(collection, self.fingerprints, self.dtype, self.mesh, indexes, self.centered, centers)

    def warm(self, k):
        """Builds both sides and compiles their scans for `k` anchors (what `prepare` and a server do)."""
        if self.size:
            for kind in ("image", "text"):
                fresh = kind not in self._indexes
                index = self.index(kind)
                if fresh:
                    _compile(index, k)
        return self


class LabelEmbeddings:
    """Unit (C, T, D) embeddings of each label under each of T templates, kept for the last `size` label sets.

    With `averaged=True` only the templates' average is kept, (C, 1, D): what "average" pooling and a
    dual encoder need, T times less memory than every caption.

    Keyed by the labels, the templates and the text encoder's fingerprint: what a label embedding depends
    on. Requests that bring the same new label set at once wait for one embedding instead of each
    running it.

    Args:
        embed: texts -> (n, D) embeddings, the text encoder's `embed` (a call may pass another, such as
            a server's micro-batched one, for the same encoder).
        size: label sets kept.
    """

    def __init__(self, embed, size=_LABEL_SETS):
        self._embed = embed
        self._size = int(size)
        self._sets = _collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, labels, templates, fingerprint, embed=None, averaged=True):
        key = (tuple(labels), templates_key(templates), fingerprint, bool(averaged))
        with self._lock:
            cached = self._sets.get(key)
            if cached is not None:
                self._sets.move_to_end(key)
            else:
                self._sets[key] = pending = Future()
                while len(self._sets) > self._size:
                    self._sets.popitem(last=False)
        if cached is not None:
            return cached.result() if isinstance(cached, Future) else cached
        try:
            embeddings = prompt_embeddings(embed or self._embed, labels, templates)
            if averaged:
                embeddings = average(embeddings)[:, None, :]
        except BaseException as error:
            with self._lock:
                if self._sets.get(key) is pending:
                    del self._sets[key]
            pending.set_exception(error)
            raise
        with self._lock:
            if self._sets.get(key) is pending:
                self._sets[key] = embeddings
        pending.set_result(embeddings)
        return embeddings


@dataclasses.dataclass(frozen=True, eq=False)
class ASIFState:
    """One published state of an ASIF model: what `snapshot()` returns and every answer is computed on.

    Attributes:
        version: int, grows by one with every state the model publishes (0: the model's first, empty one).
        anchors: the `Anchors` of the collection at one version, or None before any collection.
        k: int, anchors kept per representation.
        p: float, exponent of the kept similarities.
        unknown_threshold: float, the best score at or below which a classification is "unknown".
        labels: the model's `LabelEmbeddings`.
        label_pooling: how a label scores from its template captions (one of `POOLINGS`).
    """

    version: int
    anchors: Anchors
    k: int
    p: float
    unknown_threshold: float
    labels: LabelEmbeddings
    label_pooling: str = "max"
    _classes: dict = dataclasses.field(default_factory=dict, repr=False)

    # === What the state is over ===

    @property
    def collection(self):
        """The `AnalogyCollection` (None before any)."""
        return None if self.anchors is None else self.anchors.collection

    @property
    def collection_version(self):
        return None if self.anchors is None else self.anchors.version

    @property
    def name(self):
        return None if self.anchors is None else self.anchors.collection.name

    @property
    def pairs(self):
        """The number of anchor pairs."""
        return 0 if self.anchors is None else self.anchors.size

    @property
    def indexes(self):
        """{"image": index, "text": index} over the anchors (both built), or None when there are none."""
        if not self.pairs:
            return None
        return {kind: self.anchors.index(kind) for kind in ("image", "text")}

    def info(self):
        """{"name", "version", "pairs"}: what an answer says it was computed on."""
        return {"name": self.name, "version": self.version, "pairs": self.pairs}

    def index(self, kind):
        """The anchor index of `kind` ("image" / "text")."""
        return self._anchors().index(kind)

    def _anchors(self):
        if not self.pairs:
            raise ValueError("this ASIF model has no anchors yet: call use(collection) or add(ids, ...) first")
        return self.anchors

    # === Representations ===

    def relative(self, embeddings, kind):
        """Relative representations of `embeddings` (n, D) against the `kind` anchors."""
        anchors = self._anchors()
        index = anchors.index(kind)
        embeddings = center_rows(normalize(embeddings), anchors.center(kind))
        return relative_representation(index, embeddings, self.k, self.p, anchors.version, anchors.collection.uid)

    def check(self, representation):
        """Raises ValueError unless `representation` was computed on this state's collection version."""
        anchors = self._anchors()
        if representation.collection not in (None, anchors.collection.uid):
            raise ValueError(
                "a representation was computed against another collection than the current "
                f"{anchors.collection.name!r}: encode it again"
            )
        if representation.version != anchors.version:
            raise ValueError(
                "a representation was computed before the collection changed: encode it again "
                f"(it refers to version {representation.version}, the collection is at {anchors.version})"
            )

    def similarity(self, image_representations, text_representations):
        """(images x texts) float32 inner products of two batches of relative representations."""
        self.check(image_representations)
        self.check(text_representations)
        return sparse_inner(image_representations, text_representations)

    def retrieve(self, queries, gallery, top_k=10):
        """(indices int64 (Q, top_k), scores float32 (Q, top_k)) of the gallery items best for each query."""
        scores = self.similarity(queries, gallery)
        top_k = min(int(top_k), scores.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
        return order, np.take_along_axis(scores, order, axis=1)

    # === Labels ===

    def class_representations(self, labels, templates=None, embed=None, pooling=None):
        """Relative representations of the labels' template captions.

        With "average" pooling, one row per label (its captions' embeddings averaged, then represented);
        with "max" or "mean", one row per caption: label c's T captions are rows c * T to (c + 1) * T - 1.
        Kept on this state: repeated calls with the same labels and templates embed and search nothing.
        `embed` optionally replaces the text encoder's `embed` for labels not embedded yet; `pooling`
        replaces the state's `label_pooling`.
        """
        return self._class_side(as_labels(labels), templates, embed, self._pooling(pooling))[0]

    def _pooling(self, pooling):
        pooling = self.label_pooling if pooling is None else pooling
        return checked_pooling(pooling)

    def _class_side(self, labels, templates, embed, pooling):
        """(representation, dense copy or None, captions per row group) of a label set, once per state."""
        key = (tuple(labels), templates_key(templates), pooling)
        cached = self._classes.get(key)
        if cached is None:
            anchors = self._anchors()
            prompts = self.labels.get(labels, templates, anchors.fingerprints["text"], embed, pooling == "average")
            group = prompts.shape[1]
            embeddings = prompts.reshape(-1, prompts.shape[-1])
            representation = self.relative(embeddings, "text")
            dense = None
            if len(representation) * representation.num_anchors <= _DENSE_LABELS:
                dense = representation.to_dense()
            cached = self._classes[key] = (representation, dense, group)
        return cached

    def class_scores(self, image_representations, labels, templates=None, embed=None, pooling=None):
        """(Q, C) float32 similarity of each image representation to each label, in [0, 1]."""
        self.check(image_representations)
        pooling = self._pooling(pooling)
        representation, dense, group = self._class_side(as_labels(labels), templates, embed, pooling)
        if dense is None:
            scores = sparse_inner(image_representations, representation)
        else:
            rows = image_representations
            scores = np.einsum("cqk,qk->qc", dense[:, rows.indices], rows.values).astype(np.float32)
        return pool_scores(scores, group, pooling)

    def decide(self, scores, labels):
        """The `Classification` of `scores` (Q, C): the best label, or "unknown" at or below the threshold."""
        labels = as_labels(labels)
        best = scores.argmax(axis=1)
        confident = scores[np.arange(len(scores)), best] > self.unknown_threshold
        indices = np.where(confident, best, -1)
        names = [labels[i] if i >= 0 else UNKNOWN for i in indices]
        return Classification(names, scores, indices.astype(np.int64))

    def classify(self, image_representations, labels, templates=None, embed=None, pooling=None):
        """The `Classification` of image representations among `labels`."""
        return self.decide(self.class_scores(image_representations, labels, templates, embed, pooling), labels)

    def explain(self, image_representation, label, templates=None, top=10):
        """The anchor pairs behind the score of one image representation for `label`, heaviest first.

        Returns:
            A list of dicts {"id", "caption", "image_ref", "weight", "image_weight", "text_weight"}.
        """
        self.check(image_representation)
        collection = self._anchors().collection
        anchors, weights = self._label_weights(image_representation, label, templates)
        shared, image_at, class_at = np.intersect1d(image_representation.indices[0], anchors, return_indices=True)
        image_weight = image_representation.values[0, image_at]
        text_weight = weights[class_at]
        weight = image_weight * text_weight
        order = np.argsort(-weight, kind="stable")[: None if top is None else int(top)]
        with collection.lock:
            if not self.anchors.current:
                raise StaleStateError(
                    f"collection {collection.name!r} changed while explaining: take asif.snapshot() again"
                )
            ids, captions, refs = collection.ids, collection.captions, collection.image_refs
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


    def _label_weights(self, image_representation, label, templates):
        """(anchors, weights) of `label`'s side of its score for one image, whose inner product with the
        image's representation is that score: the label's row ("average"), its best caption's row
        ("max"), or its captions' rows averaged ("mean")."""
        pooling = self._pooling(None)
        rep = self.class_representations([label], templates)
        if pooling == "max":
            best = int(np.argmax(sparse_inner(image_representation, rep)[0]))
            return rep.indices[best], rep.values[best]
        anchors, where = np.unique(rep.indices.ravel(), return_inverse=True)
        weights = np.bincount(where.ravel(), weights=rep.values.ravel(), minlength=len(anchors)) / len(rep)
        return anchors, weights.astype(np.float32)


def relative_representation(index, embeddings, k, p, version, collection=None):
    """ASIF's sparse relative representations of `embeddings` against the anchors of `index`.

    Each row keeps its `k` largest similarities to the anchors (negatives clipped to 0), raised to the
    power `p` and L2-normalised.

    Args:
        index: an anchor index (`keras_clip_it.search.AnchorSearch`).
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
    similarities, rows = index.topk(normalize(embeddings), min(int(k), index.size))
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


def pool_scores(scores, group, pooling):
    """(Q, C) label scores from (Q, C * group) caption scores: their max or mean over each label's group."""
    if group == 1:
        return scores
    scores = scores.reshape(len(scores), -1, group)
    return (scores.max(axis=2) if pooling == "max" else scores.mean(axis=2)).astype(np.float32)


def checked_pooling(pooling):
    if pooling not in POOLINGS:
        raise ValueError(f"label_pooling must be one of {POOLINGS}, got {pooling!r}")
    return pooling


def center_rows(rows, center):
    """float32 unit rows of `rows - center` (`rows` itself when `center` is None)."""
    if center is None:
        return rows
    return normalize(np.asarray(rows, np.float32) - center)


def _moved(center, mean):
    """Whether a side's running mean has moved away from its centre by more than `_RECENTER` of the spread."""
    spread = np.sqrt(max(1.0 - float(center @ center), 1e-6))
    return float(np.linalg.norm(mean - center)) > _RECENTER * spread


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


def normalize(embeddings):
    """float32 (n, D) unit rows (no copy when they are unit already, as the encoders return them)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (n, D), got shape {embeddings.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", embeddings, embeddings))
    if norms.size and float(np.abs(norms - 1.0).max()) <= 1e-6:
        return embeddings
    return embeddings / np.maximum(norms, 1e-12)[:, None]


def as_labels(labels):
    """`labels` as a non-empty list of str (a single string is refused: it is a common slip)."""
    if isinstance(labels, str):
        raise TypeError(f"labels must be a list of class names, got the single string {labels!r}")
    labels = [str(label) for label in labels]
    if not labels:
        raise ValueError("labels is empty")
    return labels


def templates_key(templates):
    """A hashable key for `templates` (callables by identity)."""
    if templates is None or isinstance(templates, str):
        return templates
    if callable(templates):
        return id(templates)
    return tuple(t if isinstance(t, str) else id(t) for t in templates)


def _compile(index, k):
    """Runs one query, so the index's scan is compiled before any client's query needs it."""
    index.topk(np.ones((1, index.dim), np.float32), min(int(k), index.size))
