"""Exact top-k with int8 anchors in memory: screen with the codes, rescore a few rows read from float32.

int8 anchors take a quarter of the bytes of float32, but a top-k computed from them is not the float32
top-k: on random unit vectors the best and second-best anchors are often closer than int8's score error,
so the nearest anchor often differs from float32's (docs/asif.md measures how often). `RefinedIndex`
gets the exact float32 answer anyway, the way FAISS's IndexRefine and ScaNN's reordering do: the int8
`AnchorIndex` is what stays in memory, the float32 rows stay where the collection stores them (usually a
memory-mapped `.npy` segment) and only the rows of a few candidates per query are read from them.

The result is certified, not just likely. With x an anchor, s c its int8 codes times its scale and r =
|x - s c| its residual norm (kept per anchor, 4 bytes), Cauchy-Schwarz gives |q.x - q.(s c)| <= |q| r.
The int8 index returns the K best int8 scores; any other anchor scores at most the K-th of them plus
|q| max(r) in float32 (the few anchors with the largest r are kept in float32 and scored exactly, so the
max runs over the others). Among the K candidates, only those whose upper bound reaches the k-th exact
score found so far can be in the top k: those rows are read and scored exactly. If the k-th exact score
beats every other anchor's upper bound, the top k is exact; otherwise the query is screened again with K
doubled. K starts from what the previous search with the same k needed.
The bound holds for any float32 rows, so results are exact with respect to `exact_rows` even when the
int8 codes came from other rows (they are then only slower).
"""

import copy
import math
import os
import threading

import numpy as np

from keras_clip_it.collections.analogy_collection import removal_moves
from keras_clip_it.search.base import AnchorSearch, checked_query, read_index, write_index
from keras_clip_it.search.exact import BLOCK, AnchorIndex

_FLOAT32_EPS = 2.0**-24
# One anchor in OUTLIERS, the one with the largest residual, is kept in float32.
OUTLIERS = 1024


class RefinedIndex(AnchorSearch):
    """An int8 `AnchorIndex` whose top-k is made exact by rescoring candidates against float32 rows.

    Memory holds the int8 index, one float32 residual norm per anchor and the float32 rows of the 1 in
    1,024 anchors with the largest residuals (about a quarter of float32's bytes); the other float32 rows
    are read only for the candidates each query rescores (docs/asif.md gives both, from benchmarks/asif.py).
    Results equal a dense float32 computation over `exact_rows` (ties within float32 rounding excepted).

    Changes cost O(change), as the int8 index's do: `append` keeps the new float32 rows in memory beside
    `exact_rows`, `remove` renumbers rows through a table; neither copies `exact_rows`. `rows_read` and
    `queries_answered` count the float32 rows read and the queries answered by this index.

    Args:
        index: an `AnchorIndex` over the anchors, usually `dtype="int8"` (any dtype works).
        exact_rows: float32 array-like (N, D) in the index's row order, e.g. `np.load(path, mmap_mode="r")`
            or `collection.embeddings(kind, fingerprint)` of a collection opened from a local directory
            (memory-mapped). Read once here (to compute residual norms), then only at candidate rows.
        chunk: rows per step when computing the residual norms (bounds the temporaries).

    Example:
    >>> rng = np.random.default_rng(0)
    >>> anchors = rng.standard_normal((2000, 64)).astype("float32")
    >>> anchors /= np.linalg.norm(anchors, axis=1, keepdims=True)
    >>> refined = RefinedIndex(AnchorIndex(anchors, dtype="int8"), anchors)
    >>> values, rows = refined.topk(anchors[:3], k=5)
    >>> rows[:, 0].tolist()
    [0, 1, 2]
    >>> bool(np.allclose(values, np.sort(anchors[:3] @ anchors.T, axis=1)[:, ::-1][:, :5], atol=1e-6))
    True
    """

    def __init__(self, index, exact_rows, chunk=8192):
        if not isinstance(index, AnchorIndex):
            raise TypeError(f"index must be an AnchorIndex (e.g. AnchorIndex(rows, dtype='int8')), got {type(index).__name__}")
        if not (hasattr(exact_rows, "shape") and hasattr(exact_rows, "dtype") and hasattr(exact_rows, "__getitem__")):
            raise TypeError(
                "exact_rows must be an array-like with shape, dtype and row indexing (np.ndarray, np.memmap, "
                f"collection.embeddings(...)), got {type(exact_rows).__name__}"
            )
        if tuple(exact_rows.shape) != (index.size, index.dim):
            raise ValueError(
                f"exact_rows has shape {tuple(exact_rows.shape)} but the index holds {index.size} anchors of "
                f"{index.dim} dims: pass the float32 rows the index was built from, in the same row order"
            )
        if np.dtype(exact_rows.dtype) != np.float32:
            raise ValueError(
                f"exact_rows must be float32, got {np.dtype(exact_rows.dtype)}: the refined scores are float32 "
                "scores; store the rows as float32 (a float32 collection segment, or rows.astype('float32'))"
            )
        self.index = index
        self.exact_rows = exact_rows
        self.size, self.dim = index.size, index.dim
        self._rows = _Rows([exact_rows])
        self.residual_norms, self._max_stored_norm, self._max_exact_norm = _residuals(index, exact_rows, 0, chunk)
        # The anchors with the largest residuals (1 in 1,024) stay in memory in float32 and are scored
        # exactly for every query: the bound for all other anchors, which sets how many candidates a query
        # screens, is then their largest residual, lower than the largest of all (docs/asif.md: how much).
        count = self.size // OUTLIERS
        self.outliers = np.sort(np.argpartition(-self.residual_norms, count - 1)[:count]) if count else (
            np.zeros(0, np.int64)
        )
        self._outlier_rows = np.ascontiguousarray(self._rows.take(self.outliers), np.float32).reshape(-1, self.dim)
        inliers = np.ones(self.size, bool)
        inliers[self.outliers] = False
        self.max_residual = float(self.residual_norms[inliers].max()) if inliers.any() else 0.0
        self._start_counting({})

    def _start_counting(self, widths):
        self._lock = threading.Lock()
        self._widths = widths  # k -> candidates per query to screen first
        self.rows_read = 0
        self.queries_answered = 0

    @classmethod
    def build(cls, anchors, block=BLOCK, mesh=None):
        """A refined index over float32 `anchors` (N, D): their int8 `AnchorIndex`, rescored against them.

        `anchors` are kept as given (a memory-mapped array stays on disk), so they must not change.
        """
        return cls(AnchorIndex(anchors, dtype="int8", block=block, mesh=mesh), anchors)

    # === Changes ===

    def append(self, anchors):
        """A new index with float32 `anchors` (n, D) added as rows size .. size + n - 1, kept in memory
        for rescoring; this index is unchanged."""
        index = self.index.append(anchors)
        if index is self.index:
            return self
        anchors = np.array(anchors, dtype=np.float32)  # a copy: the caller may change its array
        norms, max_stored, max_exact = _residuals(index, anchors, self.size)
        new = copy.copy(self)
        new.index, new.size = index, index.size
        new._rows = self._rows.append(anchors)
        new.residual_norms = np.concatenate([self.residual_norms, norms])
        new.max_residual = max(self.max_residual, float(norms.max()))
        new._max_stored_norm = max(self._max_stored_norm, max_stored)
        new._max_exact_norm = max(self._max_exact_norm, max_exact)
        new._start_counting(dict(self._widths))
        return new

    def remove(self, rows):
        """A new index without the anchors at `rows`, renumbered as `AnchorIndex.remove`; this index is
        unchanged. The bound on the residuals stays that of the anchors before the removal (still a bound)."""
        index = self.index.remove(rows)
        if index is self.index:
            return self
        drop = np.unique(np.asarray(rows, dtype=np.int64).ravel())
        holes, movers = removal_moves(self.size, drop)
        new = copy.copy(self)
        new.index, new.size = index, index.size
        new._rows = self._rows.remove(holes, movers, index.size)
        norms = self.residual_norms.copy()
        norms[holes] = norms[movers]
        new.residual_norms = norms[: index.size]
        # Outliers keep their float32 rows in memory: the removed ones go, the moved ones get their new rows.
        renumbered = np.arange(self.size)
        renumbered[drop] = -1
        renumbered[movers] = holes
        outliers = renumbered[self.outliers]
        kept = outliers >= 0
        order = np.argsort(outliers[kept])
        new.outliers = outliers[kept][order]
        new._outlier_rows = self._outlier_rows[kept][order]
        new._start_counting(dict(self._widths))
        return new

    # === Saving ===

    def save(self, path):
        """Writes the int8 index (in `path`/int8), the float32 rows in row order, the residual norms and
        the outliers into directory `path`; `load` memory-maps the float32 rows from there."""
        self.index.save(os.path.join(path, "int8"))
        exact = np.lib.format.open_memmap(os.path.join(path, "exact_rows.npy"), "w+", np.float32, (self.size, self.dim))
        for start in range(0, self.size, 8192):
            exact[start : start + 8192] = self._rows.take(np.arange(start, min(start + 8192, self.size)))
        exact.flush()
        del exact
        options = {"max_residual": self.max_residual, "max_stored_norm": self._max_stored_norm,
                   "max_exact_norm": self._max_exact_norm}
        arrays = {"residual_norms": self.residual_norms, "outliers": self.outliers, "outlier_rows": self._outlier_rows}
        write_index(path, "RefinedIndex", options, arrays)

    @classmethod
    def load(cls, path, mesh=None):
        """The index `save` wrote at `path`; its float32 rows stay in the file, memory-mapped."""
        options, arrays = read_index(path, "RefinedIndex")
        index = AnchorIndex.load(os.path.join(path, "int8"), mesh=mesh)
        exact_rows = np.load(os.path.join(path, "exact_rows.npy"), mmap_mode="r")
        if exact_rows.shape != (index.size, index.dim) or len(arrays["residual_norms"]) != index.size:
            raise ValueError(f"{path!r}: the float32 rows {exact_rows.shape} do not match the int8 index "
                             f"({index.size}, {index.dim}): save the index again")
        refined = cls.__new__(cls)
        refined.index, refined.exact_rows = index, exact_rows
        refined.size, refined.dim = index.size, index.dim
        refined._rows = _Rows([exact_rows])
        refined.residual_norms, refined.outliers = arrays["residual_norms"], arrays["outliers"]
        refined._outlier_rows = arrays["outlier_rows"]
        refined.max_residual = options["max_residual"]
        refined._max_stored_norm, refined._max_exact_norm = options["max_stored_norm"], options["max_exact_norm"]
        refined._start_counting({})
        return refined

    def _exact(self, rows, query):
        """Exact scores of one query against `rows` (sorted), read from the float32 rows."""
        # einsum runs on this thread: a threaded BLAS matrix-vector product per query is slower on a few
        # shared cores (waking and syncing its threads costs more than the product).
        return np.einsum("md,d->m", self._rows.take(rows), query)

    @property
    def nbytes(self):
        """Bytes kept in memory per the stored anchors: the index's codes and scales, the residual norms and
        the float32 rows of the outliers."""
        return (
            self.index.nbytes + self.residual_norms.nbytes + self._outlier_rows.nbytes + self.outliers.nbytes
            + self._rows.nbytes_in_memory
        )

    @property
    def resident_nbytes(self):
        """Bytes this index keeps in memory: the int8 index's (`AnchorIndex.resident_nbytes`: its codes are
        its screening blocks), the residual norms and the outliers' float32 rows. The other float32 rows
        stay where `exact_rows` keeps them; appended ones are counted."""
        return (
            self.index.resident_nbytes + self.residual_norms.nbytes + self._outlier_rows.nbytes
            + self.outliers.nbytes + self._rows.nbytes_in_memory
        )

    def topk(self, queries, k, batch_size=256):
        """The k largest inner products of each query with `exact_rows`, exactly, as `AnchorIndex.topk`.

        Args:
            queries: float array (Q, D).
            k: number of anchors per query (at most N).
            batch_size: queries per int8 scan.

        Returns:
            (values float32 (Q, k) in decreasing order, rows int64 (Q, k)).
        """
        queries, k = checked_query(queries, k, self.dim, self.size)
        values = np.empty((len(queries), k), np.float32)
        rows = np.empty((len(queries), k), np.int64)
        if not len(queries):
            return values, rows
        pending = np.arange(len(queries))
        # Candidates per query: what most queries of the last search with this k needed (an uncertified
        # query is screened again with twice as many, which costs a whole scan).
        width = min(self.size, self._widths.get(k, 2 * k + 16))
        read, needed = 0, []
        while pending.size:
            done = np.zeros(pending.size, bool)
            for start in range(0, pending.size, batch_size):
                batch = pending[start : start + batch_size]
                got_values, got_rows, need, batch_read = self._refine(queries[batch], k, width)
                certified = need <= width
                values[batch[certified]], rows[batch[certified]] = got_values[certified], got_rows[certified]
                done[start : start + len(batch)] = certified
                read += batch_read
                needed.append(need[certified])
            pending = pending[~done]
            width = min(self.size, 2 * width)
        needed = np.concatenate(needed)
        self._widths[k] = int(min(self.size, max(k + 1, 1.1 * np.percentile(needed, 95))))
        with self._lock:
            self.rows_read += read
            self.queries_answered += len(queries)
        return values, rows

    def _refine(self, queries, k, width):
        """One screening of `width` candidates and the exact rescoring of those that can be in the top k.

        Rows are read in two steps: the k best screened candidates first, whose k-th exact score is a
        lower bound of the final k-th; then only the other candidates whose upper bound reaches it.

        Returns:
            (values (Q, k), rows (Q, k), needed int (Q,), rows read): `needed` is the number of candidates
            the certificate needs (<= width when the query's result is certified exact, width + 1 when not).
        """
        screened, candidates = self.index.topk(queries, width, batch_size=len(queries))
        q_norm = np.linalg.norm(queries.astype(np.float64), axis=1)
        # Float32 rounding of both the int8 scores and the exact ones (|error| <= ~D eps |q| |a| each).
        rounding = 1.01 * (self.dim + 2) * _FLOAT32_EPS * q_norm * (self._max_stored_norm + self._max_exact_norm)
        upper = screened + (q_norm[:, None] * self.residual_norms[candidates] + rounding[:, None])
        # Outliers are scored exactly for every query, never read as candidates.
        outlier_scores = queries @ self._outlier_rows.T
        upper[np.isin(candidates, self.outliers)] = -np.inf
        values = np.empty((len(queries), k), np.float32)
        rows = np.empty((len(queries), k), np.int64)
        needed = np.empty(len(queries), np.int64)
        read = 0
        for i, query in enumerate(queries):
            # In row order the reads go through the file (or memory) front to back.
            first = np.sort(candidates[i, :k][upper[i, :k] > -np.inf])
            read += len(first)
            chosen = np.concatenate([first, self.outliers])
            exact = np.concatenate([self._exact(first, query), outlier_scores[i]])
            # k rows scored: their k-th score is a lower bound of the final k-th, which no other candidate
            # whose upper bound is below it can reach.
            kth = -np.partition(-exact, k - 1)[k - 1]
            more = k + np.flatnonzero(upper[i, k:] >= kth)
            if more.size:
                second = np.sort(candidates[i, more])
                read += len(second)
                chosen, exact = np.concatenate([chosen, second]), np.concatenate([exact, self._exact(second, query)])
            # Ties go to the lowest row, as in a stable sort of dense scores.
            order = np.lexsort((chosen, -exact))[:k]
            values[i], rows[i] = exact[order], chosen[order]
            # Every anchor outside the candidates screens at most the last candidate's score.
            floor = values[i, -1] - q_norm[i] * self.max_residual - rounding[i]
            needed[i] = min(width, np.searchsorted(-screened[i], -floor, side="right") + 1)
            if width < self.size and screened[i, -1] >= floor:
                needed[i] = width + 1
        return values, rows, needed, read


def _residuals(index, exact_rows, first, chunk=8192):
    """Per-row |x - s c| of `exact_rows` (rows first .. of `index`), float32 rounded up, and the largest
    |s c| and |x| (for rounding bounds)."""
    count = exact_rows.shape[0]
    residuals = np.empty(count, np.float32)
    max_stored = max_exact = 0.0
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        stored, scales = index.stored_rows(np.arange(first + start, first + stop))
        dequantised = stored.astype(np.float64)
        if scales is not None:
            dequantised *= scales[:, None]
        exact = np.asarray(exact_rows[start:stop], np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", exact - dequantised, exact - dequantised))
        # float32 rounding up, so the stored norm never understates the float64 one.
        residuals[start:stop] = np.nextafter(norms.astype(np.float32), np.float32(np.inf))
        max_stored = max(max_stored, math.sqrt(np.einsum("ij,ij->i", dequantised, dequantised).max()))
        max_exact = max(max_exact, math.sqrt(np.einsum("ij,ij->i", exact, exact).max()))
    return residuals, max_stored, max_exact


class _Rows:
    """Float32 rows in row order: the caller's array-like, then appended arrays, renumbered by removals.

    Changes never copy rows into one array (the first part is usually a memory-mapped file): appends add
    a part, removals move entries of a table from rows to positions in the parts (8 bytes per row, made
    at the first removal).
    """

    def __init__(self, parts, where=None):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(part) for part in parts[:-1]])
        self.where = where  # position of each row in the parts, None while row r is at position r

    @property
    def nbytes_in_memory(self):
        """Bytes of the appended rows and of the row table (the first part stays where the caller keeps it)."""
        return sum(part.nbytes for part in self.parts[1:]) + (0 if self.where is None else self.where.nbytes)

    def take(self, rows):
        """The float32 rows at `rows` (int array (m,)) -> (m, D)."""
        at = np.asarray(rows) if self.where is None else self.where[rows]
        if len(self.parts) == 1:
            return _take(self.parts[0], at)
        part = np.searchsorted(self.starts, at, side="right") - 1
        out = np.empty((len(at), self.parts[0].shape[1]), np.float32)
        for number in np.unique(part).tolist():
            inside = part == number
            out[inside] = _take(self.parts[number], at[inside] - self.starts[number])
        return out

    def append(self, rows):
        total = int(self.starts[-1]) + len(self.parts[-1])
        where = None if self.where is None else np.concatenate([self.where, np.arange(total, total + len(rows))])
        return _Rows(self.parts + [rows], where)

    def remove(self, holes, movers, size):
        where = np.arange(int(self.starts[-1]) + len(self.parts[-1])) if self.where is None else self.where.copy()
        where[holes] = where[movers]
        return _Rows(self.parts, where[:size])


def _take(rows, at):
    """Rows `at` of an array-like: `np.take` for arrays (faster than indexing), indexing for the others."""
    if isinstance(rows, np.ndarray):
        return np.take(rows, at, axis=0)
    return np.asarray(rows[at], np.float32)

