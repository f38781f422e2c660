"""The interface every anchor search implements, and what works on any of them (`follow`, saving).

ASIF needs, for each query, its k most similar anchors out of N: an exact blocked scan, a refined int8
one, or an approximate one (FAISS) answer the same calls, so the model picks a mode by name and keeps
following its collection change by change with whichever it picked.
"""

import abc
import json
import os

import numpy as np

# The file that names an index's class and options in a saved index directory; written last.
MANIFEST = "search.json"


class AnchorSearch(abc.ABC):
    """Top-k inner-product search over N anchors (N, D), immutable: changes return a new index.

    A search running on an index during a change sees that index's anchors, never a mix, and publishing
    the changed index is one reference assignment. Rows are the anchors' positions, renumbered by
    `remove` the way `AnalogyCollection.remove` renumbers its rows, so index rows stay collection rows
    and `follow` keeps an index in step with its collection.

    Implementations set `dim` (D) and `size` (N) and provide `build`, `topk`, `append`, `remove`,
    `resident_nbytes`, `save` and `load`.
    """

    dim: int
    size: int

    @classmethod
    @abc.abstractmethod
    def build(cls, anchors, **options):
        """An index over `anchors`, float array (N, D), usually L2-normalised embeddings."""

    @abc.abstractmethod
    def topk(self, queries, k):
        """(values float32 (Q, k) in decreasing order, rows int64 (Q, k)): each query's k best anchors.

        `queries` is a float array (Q, D); `checked_query` validates both arguments the same way everywhere.
        """

    @abc.abstractmethod
    def append(self, anchors):
        """A new index with `anchors` (n, D) added as rows size .. size + n - 1; this one is unchanged."""

    @abc.abstractmethod
    def remove(self, rows):
        """A new index without the anchors at `rows`, the last rows moved into the freed positions (as
        `AnalogyCollection.remove` does); this one is unchanged."""

    @property
    @abc.abstractmethod
    def resident_nbytes(self):
        """Bytes this index keeps in memory (what a memory budget compares), not what stays on disk."""

    @abc.abstractmethod
    def save(self, path):
        """Writes the index into the local directory `path` as `.npy` files and a JSON manifest."""

    @classmethod
    @abc.abstractmethod
    def load(cls, path, **options):
        """The index saved at `path`, answering `topk` as the saved one did."""


def write_index(path, search, options, arrays):
    """Writes `arrays` ({name: array}) as `.npy` files into directory `path`, then the manifest.

    The manifest goes last, so a directory without one holds no complete index. Never pickles.

    Args:
        path: a local directory, created if missing.
        search: the class name that `read_index` expects back.
        options: JSON-serialisable settings of the index.
        arrays: {name: numpy array}.
    """
    os.makedirs(path, exist_ok=True)
    for name, array in arrays.items():
        np.save(os.path.join(path, f"{name}.npy"), np.asarray(array), allow_pickle=False)
    with open(os.path.join(path, MANIFEST), "w") as file:
        json.dump({"search": search, "options": options, "arrays": sorted(arrays)}, file)


def read_index(path, search, mmap_mode=None):
    """(options, {name: array}) of the index `write_index` saved at `path` for class `search`.

    Args:
        path: the directory.
        search: the class name the manifest must name (an error says which one it holds instead).
        mmap_mode: passed to `np.load` (e.g. "r" to leave arrays on disk until read).
    """
    manifest = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest):
        raise FileNotFoundError(f"no saved index at {path!r}: {MANIFEST} is missing (save it with index.save(path))")
    with open(manifest) as file:
        saved = json.load(file)
    if saved["search"] != search:
        raise ValueError(
            f"{path!r} holds a saved {saved['search']}, not {search}: load it with {saved['search']}.load(path)"
        )
    arrays = {
        name: np.load(os.path.join(path, f"{name}.npy"), mmap_mode=mmap_mode, allow_pickle=False)
        for name in saved["arrays"]
    }
    return saved["options"], arrays


def checked_query(queries, k, dim, size):
    """(queries as float32 (Q, dim), k as int) for a top-k over `size` anchors, or a ValueError naming the problem."""
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be (Q, {dim}), got shape {queries.shape}")
    k = int(k)
    if not 1 <= k <= size:
        raise ValueError(f"k must be between 1 and the number of anchors ({size}), got {k}")
    return queries, k


def follow(index, collection, kind, fingerprint, version, transform=None):
    """`index`, built over `collection` at `version`, brought to the collection's current version.

    Replays the changes the collection recorded since then (`AnalogyCollection.changes_since`) as
    appends and removals, so the work grows with the pairs changed, not with the collection.

    Args:
        index: an `AnchorSearch` over `collection.embeddings(kind, fingerprint)` as they were at `version`.
        collection: the `AnalogyCollection`.
        kind: "image" or "text".
        fingerprint: the encoder fingerprint of the indexed embeddings.
        version: the collection version `index` reflects.
        transform: None, or the function (n, D) rows -> (n, D) rows that `index` was built on (such as
            ASIF's centering): applied to the appended rows.

    Returns:
        The updated index (`index` itself when nothing changed), or None when the changes are no longer
        recorded: build a new index then.

    Example:
    >>> from keras_clip_it.collections import AnalogyCollection
    >>> from keras_clip_it.search import AnchorIndex
    >>> col = AnalogyCollection()
    >>> col.add(["a", "b"], embeddings={"text": {"f": np.eye(2, dtype="float32")}})
    >>> index, version = AnchorIndex(col.embeddings("text", "f")), col.version
    >>> col.remove(["a"])
    >>> follow(index, col, "text", "f", version).size
    1
    """
    changes = collection.changes_since(version)
    if changes is None:
        return None
    embeddings = collection.embeddings(kind, fingerprint) if changes else None
    for change, rows in changes:
        if change == "add":
            present = rows >= 0
            if len(rows) and rows[0] >= 0 and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
                anchors = embeddings[rows[0] : rows[0] + len(rows)]  # the usual case, rows in order: no copy
            elif present.all():
                anchors = embeddings[rows]
            else:
                # Pairs removed again by a later change need no embedding: that change removes their rows.
                anchors = np.zeros((len(rows), index.dim), np.float32)
                anchors[present] = embeddings[rows[present]]
            index = index.append(anchors if transform is None else transform(anchors))
        else:
            index = index.remove(rows)
    return index
