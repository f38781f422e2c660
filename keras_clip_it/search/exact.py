"""Exact top-k inner products against a large anchor set: the search at the heart of ASIF.

ASIF represents a query by its k most similar anchors out of N (N up to millions), so each query costs a
(D x N) product and a top-k over N. Done naively (dense scores per block, then a full top-k per block, as
in the reference code of Norelli et al.) the top-k costs as much as the product on a CPU, and the product
runs in float32. This index makes both cheaper without giving up exactness:

1. Screening: scores against a bfloat16 copy of the anchors (faster than float32 on CPUs with AMX or
   AVX512-BF16, half the memory traffic), one jitted product per fixed-size block, with a running
   top-`k + margin` kept on the host. Blocks are placed on the device once (slicing them inside a jitted
   scan made XLA fall back to a slow product), and the next block's product is dispatched before the
   current block's selection runs, so product and selection overlap. Selection is a comparison with
   the running k-th value (only the few entries above it are merged, with `argpartition`): XLA's CPU
   top-k sorts, and costs more than the product at k = 800.
2. Certification: the error of a screened score is bounded per query and anchor by Cauchy-Schwarz,
   |s~ - q.a| <= |q~| |a - a~| + |q - q~| |a| + float32 rounding. If the last kept screened score is more
   than twice that bound below the k-th, every true top-k anchor is among the kept ones.
3. Rescoring: the kept candidates are scored exactly against the stored anchors (float32, or float16 /
   int8 with per-row scales when compressed) and the best k returned. Gathering their rows waits on
   memory, not arithmetic, so it runs on every core while the product's threads are idle. Queries whose certificate fails
   (rare: many near-ties at the k-th score) are recomputed by the plain blocked scan.

Results equal a dense float32 computation up to float32 rounding of the inner products (ties excepted).
Memory stays bounded: one (queries x block) score matrix at a time; anchors are stored once per dtype
(with 1/16 spare capacity for appends) plus the bfloat16 screening copy (and one spare block), which on
one CPU device is both the host and the device copy: blocks are placed on the device without a copy.
int8 codes are screened as they are stored, so on one CPU device their blocks are views of the store.

Changes are incremental (`append`, `remove`, `follow`): an analogy collection that gains or loses 10k
pairs out of 1M updates its index in O(10k), and the first query after the change costs what any query
costs.
"""

import bisect
import concurrent.futures
import copy
import math
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

from keras_clip_it.collections.analogy_collection import removal_moves
from keras_clip_it.search.base import AnchorSearch, checked_query, read_index, write_index
from keras_clip_it.search.blocks import Block, Partial, SpareBlock, Store, aligned_copy, aligned_full
from keras_clip_it.search.candidates import Candidates, above, kth_largest
from keras_clip_it.search.compression import DTYPES, compress, decompress, max_row_norm, screen_bfloat16
from keras_clip_it.search.kernels import block_scores, plain_block_scores, shares_memory, sharded_block_topk, to_device

# Anchors per block of the scan: large enough to keep the GEMM efficient and the group-max top-k cheap,
# small enough that a (queries x block) float32 score matrix stays in cache-friendly megabytes.
BLOCK = 32768
# bfloat16 keeps 8 significant bits: relative rounding error <= 2**-8.
_FLOAT32_EPS = 2.0**-24
# Queries rescored together: their gathered rows (chunk x ~k x D floats) stay in cache.
_RESCORE_CHUNK = 2
_POOL = []
_POOL_LOCK = threading.Lock()


class AnchorIndex(AnchorSearch):
    """Anchors (N, D) prepared for exact top-k inner-product search, optionally compressed, updatable.

    Changes cost O(change), not O(N): `append` writes new anchors after the stored ones (filling the last
    partial block, then new blocks), `remove` masks the removed anchors out of the screening (their
    screened scores become -inf) and renumbers rows the way `AnalogyCollection.remove` does, so index rows
    stay collection rows. Both return a new index and leave this one untouched: a search running on the
    old index during a change sees the old anchors, never a mix, and publishing the new one is a single
    reference assignment. Masked anchors still cost scan time, so once they exceed a quarter of the
    live ones the index is rebuilt from the live anchors (amortised O(1) per removed anchor).

    Args:
        anchors: float array (N, D), usually L2-normalised embeddings.
        dtype: "float32", "float16" or "int8" (symmetric, per-row least-squares scales): how anchors are
            stored and scored exactly.
        block: anchors per block of the scan.
        mesh: optional `jax.sharding.Mesh` with one axis; blocks are spread over its devices and each
            device keeps its own running top-k, merged at the end.

    Example:
    >>> index = AnchorIndex(np.eye(4, dtype="float32"))
    >>> values, rows = index.topk(np.array([[0.0, 1.0, 0.0, 0.0]], "float32"), k=2)
    >>> int(rows[0, 0]), float(values[0, 0])
    (1, 1.0)
    >>> index = index.append(np.array([[0.0, 0.8, 0.6, 0.0]], "float32")).remove([1])
    >>> int(index.topk(np.array([[0.0, 1.0, 0.0, 0.0]], "float32"), k=1)[1][0, 0])  # row 4 moved to row 1
    1
    """

    def __init__(self, anchors, dtype="float32", block=BLOCK, mesh=None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        given, anchors = anchors, np.asarray(anchors, dtype=np.float32)
        if anchors.ndim != 2:
            raise ValueError(f"anchors must be (N, D), got shape {anchors.shape}")
        stored, scales = compress(anchors, dtype)
        if isinstance(given, np.ndarray) and np.may_share_memory(stored, given):
            stored = stored.copy()  # the caller may change its array; this index keeps what it was given
        self._start(stored, scales, dtype, block, mesh)

    def _start(self, stored, scales, dtype, block, mesh):
        """Lays out anchors already stored as `dtype` (codes and scales for int8), in row order."""
        self.dtype = dtype
        self.dim = stored.shape[1]
        self.mesh = mesh
        self._block_request = int(block)
        self._lay_out(Store(stored, scales, len(stored)), len(stored))

    @classmethod
    def build(cls, anchors, dtype="float32", block=BLOCK, mesh=None):
        """`AnchorIndex(anchors, dtype, block, mesh)`: the constructor, under the name every search has."""
        return cls(anchors, dtype=dtype, block=block, mesh=mesh)

    # === Saving ===

    def save(self, path):
        """Writes the stored anchors in row order (codes and scales for int8) into directory `path`.

        Only what was stored is saved: loading lays the anchors out again, with no masked slots, and
        `topk` answers as it does here (a changed index answers as its rebuild does). Never pickles.
        """
        arrays = {"stored": self.stored}
        if self.dtype == "int8":
            arrays["scales"] = self.scales
        write_index(path, "AnchorIndex", {"dtype": self.dtype, "block": self._block_request}, arrays)

    @classmethod
    def load(cls, path, mesh=None):
        """The index `save` wrote at `path`, its blocks on the devices of `mesh` (one device when None)."""
        options, arrays = read_index(path, "AnchorIndex")
        stored, dtype = arrays["stored"], options["dtype"]
        if dtype not in DTYPES or stored.dtype != np.dtype(dtype) or stored.ndim != 2:
            raise ValueError(f"{path!r}: stored anchors {stored.dtype} {stored.shape} do not match dtype {dtype!r}")
        index = cls.__new__(cls)
        index._start(stored, arrays.get("scales"), dtype, options["block"], mesh)
        return index

    def _lay_out(self, store, count):
        """Places the first `count` slots of `store` (rows in order, none removed) in screening blocks."""
        devices = 1 if self.mesh is None else self.mesh.devices.size
        # Blocks of equal size, at most the requested one: a last block mostly empty would cost a full product.
        blocks = max(1, -(-count // self._block_request))
        self.block = _round_up(max(16, -(-count // blocks)), 16 * devices)
        if self._codes_in_blocks():
            # int8 codes are screened as stored: the blocks are views of one aligned segment of whole blocks.
            store = store.aligned(_round_up(count, self.block))
        store.reserve(count // 16 + 1024)
        self._store = store
        self._spare_block = SpareBlock()
        self.size = self._slots = count
        # Row <-> slot tables, None while every slot holds its own row (no removal since the layout).
        self._row_of_slot = self._slot_of_row = None
        self.max_residual = self.max_norm = 0.0
        self._blocks = []
        self._screen_into_blocks(0, count)

    def _codes_in_blocks(self):
        """Whether the screening blocks are the stored int8 codes themselves (one CPU device), not a copy."""
        return self.dtype == "int8" and self.mesh is None

    def _screen_into_blocks(self, start, stop):
        """Screens slots [start, stop) of the store into the blocks: fills the last partial one, adds more.

        Works one block at a time so that preparing millions of anchors never holds a second full-size copy.
        The error terms of the certificate (`max_residual`, `max_norm`) grow with the new anchors.

        On one CPU device a block's host arrays are the device's arrays (`to_device` places aligned
        arrays without a copy), so filling the free slots of the last block writes only the new rows,
        in place: every index that shares the block masks those slots (bias -inf) until its own bias,
        a fresh copy of 4 bytes per slot, admits them. The first change written after an index claims
        its block's free slots (`Partial.claim`); a second change from the same index copies the block.
        """
        blocks = list(self._blocks)
        for offset in range(start - start % self.block, stop, self.block):
            number = offset // self.block
            lo, hi = max(start, offset), min(stop, offset + self.block)
            if number < len(blocks):
                values_device, scales_device = blocks[number].values, blocks[number].scales
                partial, bias = blocks[number].host
                bias = aligned_copy(bias)
                if not partial.claim(lo - offset, hi - offset):
                    partial = partial.copy(hi - offset)
            else:
                view = self._store.block_view(offset, self.block) if self._codes_in_blocks() else None
                values, scales = view or self._spare_block.take(self.block, self.dim, self.dtype == "int8")
                partial = Partial(values, scales, hi - offset)
                bias = aligned_full(self.block, -np.inf)
            for first, stored, stored_scales in self._store.pieces(lo, hi):
                at = first - offset
                exact = decompress(stored, stored_scales)
                if self.dtype == "int8":
                    # The codes are screened as stored: no rounding residual (and nothing to write when the
                    # block is a view of the store).
                    if not np.may_share_memory(partial.values, stored):
                        partial.values[at : at + len(stored)] = stored
                        partial.scales[at : at + len(stored)] = stored_scales
                    norm = max_row_norm(exact)
                else:
                    residual, norm = screen_bfloat16(exact, partial.values[at : at + len(stored)])
                    partial.scales[at : at + len(stored)] = 1.0
                    self.max_residual = max(self.max_residual, residual)
                self.max_norm = max(self.max_norm, norm)
            bias[lo - offset : hi - offset] = 0.0
            if number < len(blocks) and partial.shared:
                values, scales = values_device, scales_device
            else:
                values, scales = to_device(partial.values, self.mesh), to_device(partial.scales, self.mesh)
                partial.shared = shares_memory(values, partial.values) and shares_memory(scales, partial.scales)
            # A full block of live bfloat16 anchors needs neither scales nor bias: its product alone.
            plain = self.dtype != "int8" and hi - offset == self.block and not np.isneginf(bias).any()
            host = (partial, bias) if hi - offset < self.block else None
            entry = Block(values, scales, to_device(bias, self.mesh), offset, hi - offset, host, plain)
            if number < len(blocks):
                blocks[number] = entry
            else:
                blocks.append(entry)
        # Transfers run asynchronously: wait, so the change is done when this returns (not in a query).
        jax.block_until_ready([(entry.values, entry.scales, entry.bias) for entry in blocks[start // self.block :]])
        self._blocks = blocks
        if self.block - blocks[-1].filled < stop - start:
            # The next change of this size needs a new block: have one ready, its pages mapped.
            self._spare_block.prepare(self.block, self.dim, self.dtype == "int8")

    # === Changes ===

    def append(self, anchors):
        """A new index with `anchors` (n, D) added as rows size .. size + n - 1; this index is unchanged.

        Costs O(n): the anchors are written after the stored ones and into the free slots of the last
        screening block, in place when no other index derived from the same one wrote there first (on a
        mesh, or after such a second change, the last block is copied and placed on the devices again).

        Args:
            anchors: float array (n, D).
        """
        anchors = np.asarray(anchors, dtype=np.float32)
        if anchors.ndim != 2 or anchors.shape[1] != self.dim:
            raise ValueError(f"anchors to append must be (n, {self.dim}), got shape {anchors.shape}")
        if not len(anchors):
            return self
        count = len(anchors)
        stored, scales = compress(anchors, self.dtype)
        new = copy.copy(self)
        new._store = self._store.write(self._slots, stored, scales)
        new._slots, new.size = self._slots + count, self.size + count
        if self._row_of_slot is not None:
            new._row_of_slot = np.concatenate([self._row_of_slot, np.arange(self.size, new.size)])
            new._slot_of_row = np.concatenate([self._slot_of_row, np.arange(self._slots, new._slots)])
        if new.block < min(self._block_request, new._slots) // 2:
            # Laid out for a much smaller collection: small blocks would make every scan slow.
            return new._compacted()
        new._screen_into_blocks(self._slots, new._slots)
        return new

    def remove(self, rows):
        """A new index without the anchors at `rows`; this index is unchanged.

        Rows are renumbered as `AnalogyCollection.remove` renumbers its rows (the last rows move into the
        freed positions, in their order), so an index follows its collection change by change. The
        removed anchors are masked out of the screening; nothing is copied but two row tables and the
        masks of the blocks they were in.

        Args:
            rows: int row numbers in [0, size).
        """
        drop = np.unique(np.asarray(rows, dtype=np.int64).ravel())
        if drop.size == 0:
            return self
        if drop[0] < 0 or drop[-1] >= self.size:
            raise ValueError(f"rows to remove must be in [0, {self.size}), got {drop[0]} .. {drop[-1]}")
        holes, movers = removal_moves(self.size, drop)
        if self._row_of_slot is None:
            row_of_slot, slot_of_row = np.arange(self._slots), np.arange(self.size)
        else:
            row_of_slot, slot_of_row = self._row_of_slot.copy(), self._slot_of_row.copy()
        slots = slot_of_row[drop]
        row_of_slot[slots] = -1
        row_of_slot[slot_of_row[movers]] = holes
        slot_of_row[holes] = slot_of_row[movers]
        new = copy.copy(self)
        new.size = self.size - drop.size
        new._row_of_slot, new._slot_of_row = row_of_slot, slot_of_row[: new.size].copy()
        if new._slots - new.size > max(new.size // 4, self.block):
            return new._compacted()
        blocks = list(self._blocks)
        numbers = slots // self.block
        for number in np.unique(numbers).tolist():
            entry = blocks[number]
            bias = aligned_copy(entry.bias if entry.host is None else entry.host[1])
            bias[slots[numbers == number] - entry.offset] = -np.inf
            host = None if entry.host is None else (entry.host[0], bias)
            blocks[number] = entry._replace(bias=to_device(bias, self.mesh), host=host, plain=False)
        jax.block_until_ready([blocks[number].bias for number in np.unique(numbers).tolist()])
        new._blocks = blocks
        return new

    def _compacted(self):
        """A fresh layout of the live anchors in row order (no masked slots, blocks sized for them)."""
        fresh = copy.copy(self)
        values, scales = self._store.take(self._live_slots())
        fresh._lay_out(Store(values, scales, self.size), self.size)
        return fresh

    # === Stored anchors ===

    @property
    def stored(self):
        """The stored anchors (N, D) in row order: float32, float16 or int8 (times `scales`)."""
        return self._store.take(self._live_slots())[0]

    @property
    def scales(self):
        """The per-row float32 scales of int8 anchors (N,) in row order, else None."""
        return None if self._store.scales is None else self._store.take(self._live_slots())[1]

    def stored_rows(self, rows):
        """(values (m, D), int8 scales (m,) or None) of the anchors at `rows` (m,), as they are stored."""
        rows = np.asarray(rows)
        return self._store.take(rows if self._slot_of_row is None else self._slot_of_row[rows])

    @property
    def nbytes(self):
        """Bytes of the stored anchors (values plus int8 scales), without the screening copy."""
        per_row = self.dim * self._store.itemsize + (0 if self._store.scales is None else 4)
        return int(self.size * per_row)

    @property
    def resident_nbytes(self):
        """Bytes this index keeps in memory: the stored anchors with their spare rows for appends, the
        screening blocks (counted once where they are the stored int8 codes), their masks, and the spare
        block kept ready for appends. Memory shared with the caller's array counts too."""
        buffers = {}

        def add(array):
            root = array
            while isinstance(root.base, np.ndarray):
                root = root.base
            buffers[root.ctypes.data] = root.nbytes

        for array in self._store.values + (self._store.scales or []):
            add(array)
        for array in self._spare_block.arrays or ():
            add(array)
        for entry in self._blocks:
            if entry.host is not None:
                for array in (entry.host[0].values, entry.host[0].scales, entry.host[1]):
                    add(array)
        spans = sorted((start, start + size) for start, size in buffers.items())
        total = sum(size for size in buffers.values())
        for entry in self._blocks:
            for array in (entry.values, entry.scales, entry.bias):
                pointer = array.unsafe_buffer_pointer() if len(array.devices()) == 1 else None
                at = bisect.bisect_right(spans, (pointer, math.inf)) - 1 if pointer is not None else -1
                if at < 0 or spans[at][1] <= pointer:
                    total += array.nbytes  # on the device only (a copy, or a mesh's shards)
        return total

    def _live_slots(self):
        """The slot of each row, in row order."""
        return np.arange(self.size) if self._slot_of_row is None else self._slot_of_row

    def _to_rows(self, slots):
        return slots if self._row_of_slot is None else self._row_of_slot[slots]

    def exact_scores(self, queries, rows, chunk=2):
        """Exact scores of `queries` (Q, D) against anchor `rows` (Q, m) -> float32 (Q, m)."""
        rows = np.asarray(rows)
        return self._exact_scores(queries, rows if self._slot_of_row is None else self._slot_of_row[rows], chunk)

    def _exact_scores(self, queries, slots, chunk=2):
        """Exact scores against stored `slots`, `chunk` queries at a time.

        Small chunks keep the gathered rows (chunk x m x D) in cache instead of allocating gigabytes for
        a large batch.
        """
        queries = np.asarray(queries, np.float32)
        out = np.empty(slots.shape, np.float32)
        for start in range(0, len(slots), chunk):
            gathered, scales = self._store.take(slots[start : start + chunk])
            scores = np.einsum("qmd,qd->qm", gathered.astype(np.float32, copy=False), queries[start : start + chunk])
            out[start : start + chunk] = scores if scales is None else scores * scales
        return out

    # === Search ===

    def topk(self, queries, k, margin=None, batch_size=256):
        """The k largest inner products of each query with the anchors, exactly.

        Small collections (k >= N / 4) take the dense float32 path (`dense_topk`).

        Args:
            queries: float array (Q, D).
            k: number of anchors per query (at most N).
            margin: extra screened candidates kept per query (default max(2k, 64)); more makes
                certificate failures rarer. Only candidates that can still be in the top k are rescored.
            batch_size: queries per scan.

        Returns:
            (values float32 (Q, k) in decreasing order, rows int64 (Q, k)).
        """
        queries, k = checked_query(queries, k, self.dim, self.size)
        if 4 * k >= self.size:
            # Rescoring would gather a quarter of the anchors or more per query: one dense product is cheaper.
            return self.dense_topk(queries, k, batch_size)
        kept = min(self.size, k + (max(2 * k, 64) if margin is None else int(margin)))
        values = np.empty((len(queries), k), np.float32)
        rows = np.empty((len(queries), k), np.int64)
        for start in range(0, len(queries), batch_size):
            batch = queries[start : start + batch_size]
            values[start : start + len(batch)], rows[start : start + len(batch)] = self._topk_batch(batch, k, kept)
        return values, rows

    def _topk_batch(self, queries, k, kept):
        count = len(queries)
        padded = _padded_count(count)
        q = np.zeros((padded, self.dim), np.float32)
        q[:count] = queries
        q_screen = q.astype(jnp.bfloat16)
        screened, candidates, complete = self._scan(q_screen, kept, k, optimistic=True)
        if not complete[:count].all():
            redo = np.flatnonzero(~complete)
            screened[redo], candidates[redo], _ = self._scan(q_screen[redo], kept, k, optimistic=False)
        screened, candidates = screened[:count], candidates[:count]
        # Bound on |screened - exact| for every anchor (Cauchy-Schwarz on the rounding residuals).
        q_norm = np.linalg.norm(q_screen[:count].astype(np.float32), axis=1)
        q_residual = np.linalg.norm(queries - q_screen[:count].astype(np.float32), axis=1)
        bound = q_norm * self.max_residual + q_residual * self.max_norm
        bound = 1.01 * bound + 2 * self.dim * _FLOAT32_EPS * q_norm * self.max_norm + 1e-7
        values = np.empty((count, k), np.float32)
        slots = np.empty((count, k), np.int64)
        certified = np.empty(count, bool)
        # Rescoring reads scattered stored rows: bound by memory latency, not arithmetic, so it runs on
        # every core (numpy releases the GIL) while the product's threads are idle.
        _in_parallel(
            lambda start, stop: self._rescore(queries, screened, candidates, bound, k, (values, slots, certified), start, stop),
            count, step=_RESCORE_CHUNK,
        )
        certified |= kept == self.size
        rows = self._to_rows(slots)
        failed = np.flatnonzero(~certified)
        if failed.size:
            values[failed], rows[failed] = self.dense_topk(queries[failed], k)
        return values, rows

    def _rescore(self, queries, screened, candidates, bound, k, out, start, stop):
        """Exact top k of queries [start, stop) among their screened candidates, `_RESCORE_CHUNK` at a time.

        Two steps. The k best screened candidates first: their k-th exact score E is at most the true k-th,
        so only candidates with screened + bound >= E can still enter the top k (E >= screened k-th - bound,
        so this threshold is never below the one-step screened k-th - 2 bound). Then only those.
        Candidates come with their k best first (`Candidates.best`); masked anchors score -inf, below any
        threshold. Writes (values, slots, certified) into `out` at [start, stop).
        """
        values, slots, certified = out
        for lo in range(start, stop, _RESCORE_CHUNK):
            hi = min(stop, lo + _RESCORE_CHUNK)
            query, screen, bound_ = queries[lo:hi], screened[lo:hi], bound[lo:hi]
            head = np.sort(candidates[lo:hi, :k], axis=1)  # in slot order, the gathered rows come in memory order
            head_exact = self._exact_scores(query, head, chunk=_RESCORE_CHUNK)
            threshold = np.maximum(screen[:, k - 1] - 2 * bound_, head_exact.min(axis=1) - bound_)
            certified[lo:hi] = screen.min(axis=1) < threshold
            above = screen[:, k:] >= threshold[:, None]
            counts = above.sum(axis=1)
            tail = np.zeros((hi - lo, int(counts.max())), np.int64)
            for i, count in enumerate(counts.tolist()):
                tail[i, :count] = np.sort(candidates[lo + i, k:][above[i]])
            tail_exact = self._exact_scores(query, tail, chunk=_RESCORE_CHUNK)
            tail_exact[np.arange(tail.shape[1])[None, :] >= counts[:, None]] = -np.inf
            both = np.concatenate([head, tail], axis=1)
            exact = np.concatenate([head_exact, tail_exact], axis=1)
            order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
            values[lo:hi] = np.take_along_axis(exact, order, axis=1)
            slots[lo:hi] = np.take_along_axis(both, order, axis=1)

    def _scan(self, queries, kept, k, optimistic):
        """Running top-`kept` screened scores over all blocks, best first, on the host (in slots).

        Only entries at or above a lower bound of the final kept-th value are taken from a block
        (`above`, which reads the group maxima and the few groups that pass), and they are appended to
        `Candidates`, which cuts back to the best `kept` only when its buffer fills: the per-block work is
        a comparison of `block / GROUP` maxima, not a top-k. The bound is the running kept-th value; for
        the first block, the kept-th largest group maximum (kept distinct groups reach it, so the kept-th
        value does too). With `optimistic`, it is raised from the start to the value the first block
        predicts for the whole collection (twice the needed count above it): the result is exact for
        every query that still collects `kept` entries at or above that value, which `complete` reports;
        the others must be scanned again without it.

        Returns:
            (values (Q, kept), slots (Q, kept), complete bool (Q,)): each query's k best entries first, in
            no particular order, then the others.
        """
        candidates = Candidates(len(queries), kept)
        floor = np.full(len(queries), -np.inf, np.float32)
        queries = jnp.asarray(queries)
        pending = self._dispatch(queries, 0, kept)
        for number in range(len(self._blocks)):
            values, rows = pending
            if number + 1 < len(self._blocks):
                pending = self._dispatch(queries, number + 1, kept)
            offset, valid = self._blocks[number].offset, self._blocks[number].filled
            if rows is None:
                values, group_max = (np.asarray(v) for v in values)
                if number == 0:
                    expected = math.ceil(2 * kept * valid / self._slots)
                    optimistic = optimistic and expected <= kept // 2
                    bounds = kth_largest(group_max, (kept, expected) if optimistic else (kept,))
                    candidates.raise_bound(bounds[0])
                    floor = bounds[-1] if optimistic else floor
                rows, values, columns = above(values, group_max, np.maximum(candidates.bound, floor))
            else:
                values, columns = np.asarray(values), np.asarray(rows).astype(np.int64)
                rows, at = np.nonzero(values > -np.inf)
                values, columns = values[rows, at], columns[rows, at]
            candidates.add(rows, values, columns + offset)
        values, slots = candidates.best(k)
        return values, slots, values.min(axis=1) >= floor

    def _dispatch(self, queries, number, kept):
        """Starts the product for block `number` (asynchronously); returns device arrays."""
        entry = self._blocks[number]
        if self.mesh is None:
            if entry.plain:
                return plain_block_scores(queries, entry.values), None
            return block_scores(queries, entry.values, entry.scales, entry.bias), None
        m = min(kept, self.block // self.mesh.devices.size)
        return sharded_block_topk(queries, entry.values, entry.scales, entry.bias, entry.filled, mesh=self.mesh, m=m)

    def dense_topk(self, queries, k, batch_size=256):
        """The plain blocked computation: exact float32 scores per block and a running top-k merge.

        Slower than `topk` (full precision product, full top-k per block) but needs no certificate: the
        fallback for queries whose screening is inconclusive, and the reference in tests.
        """
        queries = np.asarray(queries, dtype=np.float32)
        values = np.empty((len(queries), k), np.float32)
        rows = np.empty((len(queries), k), np.int64)
        for start in range(0, len(queries), batch_size):
            batch = queries[start : start + batch_size]
            best_values = np.full((len(batch), 0), -np.inf, np.float32)
            best_rows = np.zeros((len(batch), 0), np.int64)
            for offset in range(0, self._slots, self.block):
                stop = min(offset + self.block, self._slots)
                stored, scales = self._store.slice(offset, stop)
                scores = batch @ stored.astype(np.float32, copy=False).T
                if scales is not None:
                    scores *= scales
                if self._row_of_slot is not None:
                    scores[:, self._row_of_slot[offset:stop] < 0] = -np.inf
                top = min(k, stop - offset)
                part = np.argpartition(-scores, top - 1, axis=1)[:, :top]
                best_values = np.concatenate([best_values, np.take_along_axis(scores, part, axis=1)], axis=1)
                best_rows = np.concatenate([best_rows, part + offset], axis=1)
                if best_values.shape[1] > k:
                    keep = np.argpartition(-best_values, k - 1, axis=1)[:, :k]
                    best_values = np.take_along_axis(best_values, keep, axis=1)
                    best_rows = np.take_along_axis(best_rows, keep, axis=1)
            order = np.argsort(-best_values, axis=1, kind="stable")
            values[start : start + len(batch)] = np.take_along_axis(best_values, order, axis=1)
            rows[start : start + len(batch)] = self._to_rows(np.take_along_axis(best_rows, order, axis=1))
        return values, rows


def _in_parallel(work, count, step):
    """Runs `work(start, stop)` over [0, count) in pieces of whole `step`s, one piece per core.

    For numpy work that releases the GIL. The threads are shared by every index and kept for the process.
    """
    workers = os.cpu_count() or 1
    pieces = min(workers, -(-count // step))
    if pieces <= 1:
        work(0, count)
        return
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="anchor-index"))
    size = -(-count // (pieces * step)) * step
    for future in [_POOL[0].submit(work, start, min(count, start + size)) for start in range(0, count, size)]:
        future.result()


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


def _padded_count(count):
    """Pads query batches to a power of two (at least 8) so the scan compiles for few shapes."""
    return max(8, 1 << (count - 1).bit_length())
