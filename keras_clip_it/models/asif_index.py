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
   int8 with per-row scales when compressed) and the best k returned. Queries whose certificate fails
   (rare: many near-ties at the k-th score) are recomputed by the plain blocked scan.

Results equal a dense float32 computation up to float32 rounding of the inner products (ties excepted).
Memory stays bounded: one (queries x block) score matrix at a time; anchors are stored once per dtype
plus the bfloat16 screening copy.
"""

import functools
import jax
import jax.numpy as jnp
import numpy as np

DTYPES = ("float32", "float16", "int8")
# Anchors per block of the scan: large enough to keep the GEMM efficient and the group-max top-k cheap,
# small enough that a (queries x block) float32 score matrix stays in cache-friendly megabytes.
BLOCK = 32768
# Anchors per group maximum: the host first compares block / GROUP maxima with the running k-th value.
GROUP = 8
# bfloat16 keeps 8 significant bits: relative rounding error <= 2**-8.
_FLOAT32_EPS = 2.0**-24


class AnchorIndex:
    """Anchors (N, D) prepared for exact top-k inner-product search, optionally compressed.

    Args:
        anchors: float array (N, D), usually L2-normalised embeddings.
        dtype: "float32", "float16" or "int8" (symmetric per-row scales): how anchors are stored and
            scored exactly.
        block: anchors per block of the scan.
        mesh: optional `jax.sharding.Mesh` with one axis; blocks are spread over its devices and each
            device keeps its own running top-k, merged at the end.

    Example:
    >>> index = AnchorIndex(np.eye(4, dtype="float32"))
    >>> values, rows = index.topk(np.array([[0.0, 1.0, 0.0, 0.0]], "float32"), k=2)
    >>> int(rows[0, 0]), float(values[0, 0])
    (1, 1.0)
    """

    def __init__(self, anchors, dtype="float32", block=BLOCK, mesh=None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        anchors = np.asarray(anchors, dtype=np.float32)
        if anchors.ndim != 2:
            raise ValueError(f"anchors must be (N, D), got shape {anchors.shape}")
        self.dtype = dtype
        self.size, self.dim = anchors.shape
        self.mesh = mesh
        devices = 1 if mesh is None else mesh.devices.size
        self.block = _round_up(max(16, min(int(block), max(self.size, 1))), 16 * devices)
        self.stored, self.scales = _compress(anchors, dtype)
        screen_scales = self.scales if dtype == "int8" else np.ones(self.size, np.float32)
        screen = np.empty((self.size, self.dim), jnp.bfloat16)
        # Worst-case screening error terms over anchors: |a - a~| and |a|, computed in chunks so that
        # preparing 1.5M anchors never holds a second float32 copy.
        self.max_residual = self.max_norm = 0.0
        for start in range(0, self.size, 65536):
            stop = min(start + 65536, self.size)
            exact = _decompress(self.stored[start:stop], None if self.scales is None else self.scales[start:stop])
            chunk = self.stored[start:stop] if dtype == "int8" else _to_bfloat16(exact)
            screen[start:stop] = chunk
            approx = chunk.astype(np.float32) * screen_scales[start:stop, None]
            self.max_residual = max(self.max_residual, float(np.linalg.norm(exact - approx, axis=1).max()))
            self.max_norm = max(self.max_norm, float(np.linalg.norm(exact, axis=1).max()))
        self._blocks = []
        for offset in range(0, self.size, self.block):
            values = screen[offset : offset + self.block]
            scales = screen_scales[offset : offset + self.block]
            pad = self.block - len(values)
            if pad:
                values = np.pad(values, ((0, pad), (0, 0)))
                scales = np.pad(scales, (0, pad))
            self._blocks.append((_to_device(values, mesh), _to_device(scales, mesh), offset, self.block - pad))

    @property
    def nbytes(self):
        """Bytes of the stored anchors (values plus int8 scales), without the screening copy."""
        return int(self.stored.nbytes + (0 if self.scales is None else self.scales.nbytes))

    def exact_scores(self, queries, rows, chunk=2):
        """Exact scores of `queries` (Q, D) against anchor `rows` (Q, m) -> float32 (Q, m).

        Runs `chunk` queries at a time so the gathered rows (chunk x m x D) stay small enough to be
        reused from cache instead of allocating gigabytes for a large batch.
        """
        queries = np.asarray(queries, np.float32)
        rows = np.asarray(rows)
        out = np.empty(rows.shape, np.float32)
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            gathered = self.stored[part].astype(np.float32, copy=False)
            scores = np.einsum("qmd,qd->qm", gathered, queries[start : start + chunk])
            out[start : start + chunk] = scores if self.scales is None else scores * self.scales[part]
        return out

    def topk(self, queries, k, margin=None, batch_size=256):
        """The k largest inner products of each query with the anchors, exactly.

        Args:
            queries: float array (Q, D).
            k: number of anchors per query (at most N).
            margin: extra screened candidates kept per query (default max(2k, 64)); more makes
                certificate failures rarer. Only candidates that can still be in the top k are rescored.
            batch_size: queries per scan.

        Returns:
            (values float32 (Q, k) in decreasing order, rows int64 (Q, k)).
        """
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got shape {queries.shape}")
        k = int(k)
        if not 1 <= k <= self.size:
            raise ValueError(f"k must be between 1 and the number of anchors ({self.size}), got {k}")
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
        screened, candidates, complete = self._scan(q_screen, kept, optimistic=True)
        if not complete[:count].all():
            redo = np.flatnonzero(~complete)
            screened[redo], candidates[redo], _ = self._scan(q_screen[redo], kept, optimistic=False)
        screened, candidates = screened[:count], candidates[:count]
        # Bound on |screened - exact| for every anchor (Cauchy-Schwarz on the rounding residuals).
        q_norm = np.linalg.norm(q_screen[:count].astype(np.float32), axis=1)
        q_residual = np.linalg.norm(queries - q_screen[:count].astype(np.float32), axis=1)
        bound = q_norm * self.max_residual + q_residual * self.max_norm
        bound = 1.01 * bound + 2 * self.dim * _FLOAT32_EPS * q_norm * self.max_norm + 1e-7
        threshold = screened[:, k - 1] - 2 * bound
        certified = (kept == self.size) | (screened[:, kept - 1] < threshold)
        # Only candidates above the threshold can be in the top k: rescore just those (the first
        # `needed` columns, as candidates are sorted by screened score).
        needed = max(k, int((screened >= threshold[:, None]).sum(axis=1).max()))
        candidates = candidates[:, :needed]
        exact = self.exact_scores(queries, candidates)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        values = np.take_along_axis(exact, order, axis=1)
        rows = np.take_along_axis(candidates, order, axis=1)
        failed = np.flatnonzero(~certified)
        if failed.size:
            values[failed], rows[failed] = self.dense_topk(queries[failed], k)
        return values, rows

    def _scan(self, queries, kept, optimistic):
        """Running top-`kept` screened scores over all blocks, best first, on the host.

        Entries below the running kept-th value can never enter the top-`kept`, so later blocks only
        pass on the few entries above it (`_above`). Early on that bound is weak (after one block of 3%
        of the anchors, 7% of the next block passes). With `optimistic`, the bound is raised from the
        start to the value the first block predicts for the whole collection (twice the needed count
        above it): the result is exact for every query that still collects `kept` entries above that
        value, which `complete` reports; the others must be scanned again without it.

        Returns:
            (values (Q, kept), rows (Q, kept), complete bool (Q,)).
        """
        best_values = np.full((len(queries), 0), -np.inf, np.float32)
        best_rows = np.zeros((len(queries), 0), np.int64)
        floor = np.full(len(queries), -np.inf, np.float32)
        queries = jnp.asarray(queries)
        pending = self._dispatch(queries, 0, kept)
        for number in range(len(self._blocks)):
            values, rows = pending
            if number + 1 < len(self._blocks):
                pending = self._dispatch(queries, number + 1, kept)
            _, _, offset, valid = self._blocks[number]
            if rows is None:
                values, group_max = (np.asarray(v) for v in values)
                # Comparing pays once few entries pass: the floor keeps ~2 kept / N of them, the
                # running k-th value kept / (anchors seen).
                passing = min(kept / offset if offset else 1.0, 2 * kept / self.size if optimistic else 1.0)
                if best_values.shape[1] == kept and passing < 0.02:
                    values, rows = _above(values, group_max, np.maximum(best_values.min(axis=1), floor), valid)
                else:
                    values = values[:, :valid]
                    rows = np.broadcast_to(np.arange(values.shape[1]), values.shape)
            else:
                values, rows = np.asarray(values), np.asarray(rows).astype(np.int64)
            best_values = np.concatenate([best_values, values], axis=1)
            best_rows = np.concatenate([best_rows, rows + offset], axis=1)
            if best_values.shape[1] > kept:
                keep = np.argpartition(-best_values, kept - 1, axis=1)[:, :kept]
                best_values = np.take_along_axis(best_values, keep, axis=1)
                best_rows = np.take_along_axis(best_rows, keep, axis=1)
            expected = int(np.ceil(2 * kept * valid / self.size))
            if optimistic and number == 0 and best_values.shape[1] == kept and expected <= kept // 2:
                floor = -np.partition(-best_values, expected - 1, axis=1)[:, expected - 1]
        order = np.argsort(-best_values, axis=1, kind="stable")
        values, rows = np.take_along_axis(best_values, order, axis=1), np.take_along_axis(best_rows, order, axis=1)
        return values, rows, values[:, kept - 1] > floor

    def _dispatch(self, queries, number, kept):
        """Starts the product for block `number` (asynchronously); returns device arrays."""
        anchors, scales, offset, valid = self._blocks[number]
        if self.mesh is None:
            return _block_scores(queries, anchors, scales), None
        m = min(kept, self.block // self.mesh.devices.size)
        return _sharded_block_topk(queries, anchors, scales, valid, mesh=self.mesh, m=m)

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
            for offset in range(0, self.size, self.block):
                stop = min(offset + self.block, self.size)
                anchors = self.stored[offset:stop].astype(np.float32)
                scores = batch @ anchors.T
                if self.scales is not None:
                    scores *= self.scales[offset:stop]
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
            rows[start : start + len(batch)] = np.take_along_axis(best_rows, order, axis=1)
        return values, rows


def _above(values, group_max, threshold, valid):
    """The entries of each row of `values` above that row's `threshold`, packed left, padded with -inf.

    Once the running top-`kept` is full, its smallest value bounds what can still enter it; a block
    holds only a few such entries per query. Group maxima (computed with the product) find the groups
    that hold them, so the host compares `block / GROUP` maxima and a few groups instead of running a
    top-k over the whole block.

    Returns:
        (values float32 (Q, m), columns int64 (Q, m)) with m the largest count over rows.
    """
    hit_rows, hit_groups = np.nonzero(group_max > threshold[:, None])
    grouped = values.reshape(len(values), -1, GROUP)[hit_rows, hit_groups]
    columns = hit_groups[:, None] * GROUP + np.arange(GROUP)
    inside = (grouped > threshold[hit_rows, None]) & (columns < valid)
    which, slot_in_group = np.nonzero(inside)
    rows, columns, found = hit_rows[which], columns[which, slot_in_group], grouped[which, slot_in_group]
    counts = np.bincount(rows, minlength=len(values))
    width = int(counts.max(initial=0))
    packed_values = np.full((len(values), width), -np.inf, np.float32)
    packed_columns = np.zeros((len(values), width), np.int64)
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    packed_values[rows, slot] = found
    packed_columns[rows, slot] = columns
    return packed_values, packed_columns


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


def _padded_count(count):
    """Pads query batches to a power of two (at least 8) so the scan compiles for few shapes."""
    return max(8, 1 << (count - 1).bit_length())


def _to_bfloat16(values):
    """float32 -> bfloat16 with round-to-nearest-even on the bit pattern (ml_dtypes' cast is ~10x slower)."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype(np.uint16).view(jnp.bfloat16)


def _compress(anchors, dtype):
    if dtype == "float32":
        return np.ascontiguousarray(anchors), None
    if dtype == "float16":
        return anchors.astype(np.float16), None
    scales = np.abs(anchors).max(axis=1) / 127.0
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    return np.clip(np.rint(anchors / scales[:, None]), -127, 127).astype(np.int8), scales


def _decompress(stored, scales):
    values = np.asarray(stored, dtype=np.float32)
    return values if scales is None else values * scales[:, None]


def _to_device(array, mesh):
    if mesh is None:
        return jnp.asarray(array)
    spec = jax.sharding.PartitionSpec(mesh.axis_names[0])
    return jax.device_put(array, jax.sharding.NamedSharding(mesh, spec))


def _screen_scores(queries, anchors, scales):
    """Screened scores (Q, block) of bfloat16 queries against one block (bfloat16 or int8 anchors)."""
    scores = jax.lax.dot_general(
        queries, anchors.astype(jnp.bfloat16), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    return scores * scales[None, :]


@jax.jit
def _block_scores(queries, anchors, scales):
    """Screened scores of one block and their maxima per group of GROUP anchors (fused, nearly free)."""
    scores = _screen_scores(queries, anchors, scales)
    return scores, scores.reshape(scores.shape[0], -1, GROUP).max(axis=2)


@functools.partial(jax.jit, static_argnames=("mesh", "m"))
def _sharded_block_topk(queries, anchors, scales, valid, mesh, m):
    """Each device scores its slice of the block and keeps its own top-m; returns all (Q, devices * m).

    On accelerators this keeps the selection on the device that holds the anchors: only devices x m
    candidates per query cross the interconnect, never the block's scores.
    """
    axis = mesh.axis_names[0]
    spec = jax.sharding.PartitionSpec
    local_size = anchors.shape[0] // mesh.devices.size

    def local(queries, anchors, scales):
        first = jax.lax.axis_index(axis) * local_size
        scores = _screen_scores(queries, anchors, scales)
        rows = first + jnp.arange(local_size, dtype=jnp.int32)
        values, positions = jax.lax.top_k(jnp.where(rows[None, :] < valid, scores, -jnp.inf), m)
        return values, positions.astype(jnp.int32) + first

    return jax.shard_map(
        local, mesh=mesh, in_specs=(spec(), spec(axis), spec(axis)), out_specs=(spec(None, axis), spec(None, axis)),
        check_vma=False,
    )(queries, anchors, scales)
