"""An analogy collection: the (image, caption) pairs that turn two unimodal encoders into ASIF.

The collection *is* the ASIF model: its rows are the anchors every query is compared with, so adding or
removing pairs changes the model at once. This module keeps the state in memory (lists plus one float32
array per (kind, encoder fingerprint), whose first len(collection) rows are valid); durable storage on
fsspec builds on the same state. Every change costs O(pairs changed) and is recorded, so the anchor
indexes derived from a collection follow it incrementally (`changes_since`) instead of being rebuilt.
"""

import functools
import itertools
import threading

import numpy as np

from keras_clip_it.collections import storage
from keras_clip_it.collections.columns import aligned
from keras_clip_it.collections.columns import as_ids
from keras_clip_it.collections.memory import prefault

KINDS = ("image", "text")
# Changes kept for `changes_since`: a model further behind than this rebuilds what it derived.
_RECORDED_CHANGES = 256
_UIDS = itertools.count(1)


def _locked(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


class AnalogyCollection:
    """Image-caption pairs with their embeddings per encoder, in memory.

    Rows are identified by unique string ids. Embeddings are kept per (kind, fingerprint) so one
    collection can serve several encoder pairs, and a model never mixes embeddings from encoders it does
    not use. Row order: `add` appends in the given order; `remove` moves the last rows into the freed
    positions, so adding or removing 10k pairs in a 1M-pair collection costs O(10k), never a pass over
    the collection. `version` grows by one on every change, so models cache what they derive from
    the collection (class representations, compressed anchors) and notice when it is stale; the last
    changes are recorded (`changes_since`) so that they can update what they derived in O(change).

    Args:
        name: str, a short name shown in messages (e.g. "emoji-it").
        language: str, the language of the captions ("it", "en", ...).

    Example:
    >>> col = AnalogyCollection(name="demo", language="it")
    >>> col.add(["a", "b"], captions=["un gatto", "un cane"],
    ...         embeddings={"text": {"f0": np.eye(2, dtype="float32")}})
    >>> len(col), col.version
    (2, 1)
    >>> col.remove(["a"]); col.captions
    ['un cane']
    """

    def __init__(self, name="collection", language="en"):
        self.name = str(name)
        self.language = str(language)
        self._ids = []
        self._captions = []
        self._image_refs = []
        self._metadata = []
        self._rows = {}
        self._embeddings = {}
        # (kind, fingerprint) -> (id of the buffer, rows before which its spare rows are mapped or mapping).
        self._mapped = {}
        # (kind, fingerprint) -> float64 (D,) sum of the rows, kept from its first use on by add and remove.
        self._sums = {}
        self.version = 0
        # Unique in the process: what a model keys the state it derived from this collection on.
        self.uid = next(_UIDS)
        # (version, "add" | "remove", (first row, ids) added | rows removed) for the last _RECORDED_CHANGES changes.
        self._changes = []
        # Held by every change; hold it to read a consistent state over several calls (as index updates do).
        self.lock = threading.RLock()

    def __len__(self):
        return len(self._ids)

    def __repr__(self):
        encoders = ", ".join(f"{kind}:{fp[:8]}" for kind, fp in self._embeddings) or "none"
        return f"AnalogyCollection(name={self.name!r}, language={self.language!r}, pairs={len(self)}, embeddings=[{encoders}])"

    @property
    def ids(self):
        """The row ids, in row order (a copy: changing it does not change the collection)."""
        return list(self._ids)

    @property
    def captions(self):
        """The captions, aligned with `ids` (None where a pair has no caption)."""
        return list(self._captions)

    @property
    def image_refs(self):
        """The image references (paths, URIs or None), aligned with `ids`."""
        return list(self._image_refs)

    @property
    def metadata(self):
        """The metadata dicts, aligned with `ids`."""
        return list(self._metadata)

    @property
    def fingerprints(self):
        """{"image": [fingerprints...], "text": [...]}: the encoders this collection has embeddings for."""
        return {kind: sorted(fp for k, fp in self._embeddings if k == kind) for kind in KINDS}

    def has_embeddings(self, kind, fingerprint):
        """Whether rows are embedded with the `kind` encoder whose fingerprint is `fingerprint`."""
        return (_check_kind(kind), str(fingerprint)) in self._embeddings

    def rows(self, ids):
        """The row positions of `ids` (int64 array); unknown ids raise KeyError naming them."""
        ids = as_ids(ids)
        try:
            return np.fromiter(map(self._rows.__getitem__, ids), dtype=np.int64, count=len(ids))
        except KeyError:
            missing = [i for i in ids if i not in self._rows]
            raise KeyError(f"collection {self.name!r} has no pairs with ids {_preview(missing)}") from None

    def embeddings(self, kind, fingerprint):
        """The (N, D) float32 embeddings of every row by one encoder, aligned with `ids`.

        Args:
            kind: "image" or "text".
            fingerprint: the encoder's `fingerprint`.

        Returns:
            A read-only view of the stored rows, valid until the next change of the collection (copy it
            to keep it).
        """
        key = (_check_kind(kind), str(fingerprint))
        if key not in self._embeddings:
            have = self.fingerprints[kind]
            raise KeyError(
                f"collection {self.name!r} was embedded with {kind} encoders {have}, this model uses "
                f"{fingerprint}: call col.embed({kind}_encoder=...) or add the pairs with {kind} embeddings "
                "from this encoder"
            )
        view = self._embeddings[key][: len(self)]
        view.flags.writeable = False
        return view

    @_locked
    def embedding_mean(self, kind, fingerprint):
        """The float32 (D,) mean of one encoder's embeddings (zeros for an empty collection).

        The first call sums the rows; from then on `add` and `remove` keep the sum up to date in
        O(pairs changed), so a model centering its anchors (`ASIF(center=True)`) can follow the mean of
        a changing collection without passing over it.
        """
        key = (_check_kind(kind), str(fingerprint))
        rows = self.embeddings(kind, fingerprint)
        if key not in self._sums:
            self._sums[key] = rows.sum(axis=0, dtype=np.float64)
        return (self._sums[key] / max(len(self), 1)).astype(np.float32)

    @_locked
    def add(self, ids, captions=None, image_refs=None, metadata=None, embeddings=None):
        """Appends pairs after the existing rows.

        Every embedding array already in the collection must be given for the new rows too (a collection
        never holds rows that one of its encoders has not embedded); a new fingerprint is accepted only for
        an empty collection (embed a non-empty one with `embed` or `set_embeddings`).

        Args:
            ids: list of unique str ids not already in the collection.
            captions: list of str (or None), aligned with `ids`.
            image_refs: list of paths/URIs (or None), aligned with `ids`.
            metadata: list of dicts (or None), aligned with `ids`.
            embeddings: {"image"|"text": {fingerprint: (n, D) array}} for the new rows.
        """
        ids = as_ids(ids)
        n = len(ids)
        captions = aligned(captions, n, "captions")
        image_refs = aligned(image_refs, n, "image_refs")
        metadata = [dict(m) if m is not None else {} for m in aligned(metadata, n, "metadata")]
        new = _check_embeddings(embeddings, n)
        missing = [key for key in self._embeddings if key not in new]
        if len(self) and missing:
            raise ValueError(
                f"collection {self.name!r} holds embeddings for {_keys(missing)}: pass them for the new "
                "pairs too (embeddings={kind: {fingerprint: array}})"
            )
        extra = [key for key in new if key not in self._embeddings]
        if len(self) and extra:
            raise ValueError(
                f"embeddings for {_keys(extra)} would cover only the new pairs: embed the whole collection "
                "with col.embed(...) or col.set_embeddings(...) first"
            )
        for key, array in new.items():
            old = self._embeddings.get(key)
            if old is not None and old.shape[1] != array.shape[1]:
                raise ValueError(f"{_keys([key])} embeddings have {old.shape[1]} dims, got {array.shape[1]}")
        start = len(self._ids)
        # Inserting the ids is the duplicate check (one pass over the id table instead of two): a
        # repeated or known id leaves fewer new keys, and the table is then rebuilt from the rows' ids.
        rows, before = self._rows, len(self._rows)
        rows.update(zip(ids, range(start, start + n)))
        if len(rows) != before + n:
            self._rows = {i: row for row, i in enumerate(self._ids)}
            duplicates = sorted({i for i in ids if i in self._rows} | _repeated(ids))
            raise ValueError(f"ids already in collection {self.name!r} or repeated: {_preview(duplicates)}")
        try:
            for key, array in new.items():
                self._embeddings[key] = _append_rows(self._embeddings.get(key), start, array)
                self._map_ahead(key, start + n, n)
        except BaseException:  # e.g. out of memory while growing: the collection stays as it was
            for i in ids:
                del rows[i]
            raise
        for key, total in self._sums.items():
            total += np.asarray(new[key], np.float32).sum(axis=0, dtype=np.float64)
        self._ids.extend(ids)
        self._captions.extend(captions)
        self._image_refs.extend(image_refs)
        self._metadata.extend(metadata)
        self._record("add", (start, ids))

    def _map_ahead(self, key, size, added):
        """Keeps the spare rows that the next additions of this size will write mapped (`memory.prefault`).

        At most 1/8 of the rows ahead, as much memory as the spare rows the buffer used to write at once.
        """
        buffer = self._embeddings[key]
        mapped = self._mapped.get(key)
        row = mapped[1] if mapped is not None and mapped[0] == id(buffer) else size
        ahead = min(4 * added, size // 16) + 4096
        if row < size + ahead and row < len(buffer):
            stop = min(len(buffer), size + 2 * ahead)
            prefault(buffer[max(row, size) : stop])
            row = stop
        self._mapped[key] = (id(buffer), row)

    @_locked
    def remove(self, ids):
        """Deletes the pairs with these ids.

        Row order after a removal: the last rows of the collection move into the freed positions (in
        their order), every other row keeps its position. This costs O(removed) work whatever the
        collection size; `ids` always tells the current order.

        Args:
            ids: list of str ids in the collection (unknown ids raise KeyError naming them).
        """
        drop = np.unique(self.rows(ids))
        if drop.size == 0:
            return
        size = len(self)
        new_size = size - drop.size
        holes, movers = removal_moves(size, drop)
        for key, total in self._sums.items():
            total -= self._embeddings[key][drop].sum(axis=0, dtype=np.float64)
        for array in self._embeddings.values():
            array[holes] = array[movers]
        rows, ids = self._rows, self._ids
        for row in drop.tolist():
            del rows[ids[row]]
        holes, movers = holes.tolist(), movers.tolist()
        for values in (self._ids, self._captions, self._image_refs, self._metadata):
            moved = [values[mover] for mover in movers]
            for hole, value in zip(holes, moved):
                values[hole] = value
            del values[new_size:]
        rows.update(zip([ids[hole] for hole in holes], holes))
        self._record("remove", drop)

    @_locked
    def set_embeddings(self, kind, fingerprint, array):
        """Stores (N, D) embeddings of every row by one encoder (replacing any with that fingerprint)."""
        key = (_check_kind(kind), str(fingerprint))
        array = _as_matrix(array, f"{kind} embeddings {fingerprint[:12]}")
        if array.shape[0] != len(self):
            raise ValueError(f"{kind} embeddings have {array.shape[0]} rows, collection {self.name!r} has {len(self)}")
        self._embeddings[key] = array
        self._mapped.pop(key, None)
        self._sums.pop(key, None)
        self.version += 1
        # Embeddings replaced: nothing derived from the old ones can be updated incrementally.
        self._changes = []

    def changes_since(self, version):
        """The changes after `version`, oldest first, so a model can update what it derived in O(change).

        Args:
            version: a past value of `version`.

        Returns:
            A list of ("add", rows) and ("remove", rows) with int64 row arrays: for an addition, the
            current rows of the pairs it added (-1 for those removed since), in the order they were added
            at the end of the collection; for a removal, the rows it removed (sorted), numbered as they
            were just before it (the last rows then moved into the freed positions, see `remove`).
            None when those changes are not all recorded any more (after `set_embeddings`, or more than
            256 changes ago): rebuild from `embeddings()` then.

        Example:
        >>> col = AnalogyCollection()
        >>> col.add(["a", "b"], embeddings={"text": {"f": np.eye(2, dtype="float32")}})
        >>> col.remove(["a"])
        >>> [(change, rows.tolist()) for change, rows in col.changes_since(0)]
        [('add', [-1, 0]), ('remove', [0])]
        """
        version = int(version)
        if version == self.version:
            return []
        recorded = [entry for entry in self._changes if entry[0] > version]
        if version > self.version or len(recorded) != self.version - version:
            return None
        out = []
        for number, (_, change, payload) in enumerate(recorded):
            if change == "remove":
                out.append((change, payload))
            elif any(later[1] == "remove" for later in recorded[number + 1 :]):
                # A later removal may have moved or deleted these pairs: look their rows up.
                get = self._rows.get
                out.append((change, np.fromiter((get(i, -1) for i in payload[1]), np.int64, len(payload[1]))))
            else:
                start, ids = payload
                out.append((change, np.arange(start, start + len(ids), dtype=np.int64)))
        return out

    def _record(self, change, payload):
        self.version += 1
        self._changes.append((self.version, change, payload))
        if len(self._changes) > _RECORDED_CHANGES:
            del self._changes[0]

    def copy(self, rows=None, name=None, fingerprints=None):
        """A new in-memory collection of these rows (all by default, in this order) and their embeddings.

        Args:
            rows: optional int row positions to copy, in the copy's order.
            name: the copy's name (default: this collection's).
            fingerprints: optional {"image": fingerprint, "text": fingerprint}: copy only these encoders'
                embeddings (default: every encoder's).

        Returns:
            An `AnalogyCollection` sharing nothing with this one.
        """
        with self.lock:
            rows = np.arange(len(self)) if rows is None else np.asarray(rows, np.int64)
            keys = list(self._embeddings) if fingerprints is None else [(k, str(f)) for k, f in fingerprints.items()]
            embeddings = {}
            for kind, fingerprint in keys:
                embeddings.setdefault(kind, {})[fingerprint] = np.array(self.embeddings(kind, fingerprint)[rows])
            pick = [int(row) for row in rows]
            copy = AnalogyCollection(name=self.name if name is None else name, language=self.language)
            if pick:
                copy.add(
                    [self._ids[row] for row in pick],
                    captions=[self._captions[row] for row in pick],
                    image_refs=[self._image_refs[row] for row in pick],
                    metadata=[self._metadata[row] for row in pick],
                    embeddings=embeddings,
                )
            return copy

    def save(self, uri, dtype="float32"):
        """Writes the collection to a directory at any fsspec URI (see `keras_clip_it.collections.storage`).

        Open it again with `kci.collections.load(uri)`.

        Args:
            uri: str or os.PathLike, e.g. "/data/films-it", "memory://films-it", "s3://bucket/films-it".
            dtype: "float32", "float16" or "int8" (per-row scales): how embeddings are stored.
        """
        return storage.save_collection(self, uri, dtype=dtype)

    def embed(self, image_encoder=None, text_encoder=None, images=None, batch_size=32):
        """Computes the embeddings this collection lacks for the given encoders.

        Captions are embedded from `captions`; images from `images` (aligned with `ids`: arrays, PIL
        images, paths) or else from `image_refs`.

        Args:
            image_encoder: an encoder with `embed()` and `fingerprint`, or None.
            text_encoder: likewise for captions, or None.
            images: optional images aligned with `ids`.
            batch_size: images per encoder batch.
        """
        if text_encoder is not None and not self.has_embeddings("text", text_encoder.fingerprint):
            if any(c is None for c in self._captions):
                raise ValueError(f"collection {self.name!r} has pairs without captions: cannot embed texts")
            self.set_embeddings("text", text_encoder.fingerprint, text_encoder.embed(self._captions))
        if image_encoder is not None and not self.has_embeddings("image", image_encoder.fingerprint):
            if images is None:
                if any(r is None for r in self._image_refs):
                    raise ValueError(
                        f"collection {self.name!r} has pairs without image_refs: pass images= aligned with ids"
                    )
                images = self._image_refs
            if len(images) != len(self):
                raise ValueError(f"{len(images)} images for {len(self)} pairs in collection {self.name!r}")
            embedded = image_encoder.embed(images, batch_size=batch_size)
            self.set_embeddings("image", image_encoder.fingerprint, embedded)


def removal_moves(size, drop):
    """How removing rows `drop` (sorted, unique) from `size` rows renumbers the others.

    The last rows move into the freed positions below the new size, in their order, so a removal costs
    O(removed) and every other row keeps its number.

    Returns:
        (holes, movers): int64 arrays; row movers[i] becomes row holes[i].
    """
    new_size = size - drop.size
    holes = drop[drop < new_size]
    tail = np.arange(new_size, size)
    return holes, tail[~np.isin(tail, drop, assume_unique=True)]


def _append_rows(buffer, size, rows):
    """Writes `rows` after the first `size` rows of `buffer`, doubling its capacity when full.

    Doubling makes a collection that grows by small additions copy its buffer O(log N) times: a 1M-row
    buffer is copied once per 1M rows added, not every 125k (where each copy of 1M x 384 floats stalled
    an addition for seconds). The spare rows are only reserved (address space, not memory); the
    collection maps the few that the next additions will write ahead of them (`_map_ahead`). When twice
    the rows cannot be reserved, the buffer grows by 1/8 instead.
    """
    needed = size + rows.shape[0]
    if buffer is None or buffer.shape[0] < needed:
        try:
            grown = np.empty((2 * needed + 64, rows.shape[1]), np.float32)
        except MemoryError:
            grown = np.empty((needed + needed // 8 + 64, rows.shape[1]), np.float32)
        if buffer is not None:
            grown[:size] = buffer[:size]
        buffer = grown
    buffer[size:needed] = rows
    return buffer


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"kind must be 'image' or 'text', got {kind!r}")
    return kind




def _repeated(ids):
    if len(set(ids)) == len(ids):
        return set()
    seen, repeated = set(), set()
    for i in ids:
        (repeated if i in seen else seen).add(i)
    return repeated




def _as_matrix(array, what):
    array = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-d array (pairs, dims), got shape {array.shape}")
    return array


def _check_embeddings(embeddings, n):
    out = {}
    for kind, by_fingerprint in (embeddings or {}).items():
        _check_kind(kind)
        for fingerprint, array in by_fingerprint.items():
            array = _as_matrix(array, f"{kind} embeddings {str(fingerprint)[:12]}")
            if array.shape[0] != n:
                raise ValueError(f"{kind} embeddings {str(fingerprint)[:12]} have {array.shape[0]} rows for {n} ids")
            out[(kind, str(fingerprint))] = array
    return out


def _keys(keys):
    return ", ".join(f"{kind}:{fp[:12]}" for kind, fp in keys)


def _preview(items, limit=10):
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


storage.opens_as(AnalogyCollection)
