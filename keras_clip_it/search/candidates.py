"""The running top-`kept` screened entries of each query, and the selection that feeds it from a block."""

import numpy as np

from keras_clip_it.search.kernels import GROUP


class Candidates:
    """The running top-`kept` entries of each query, merged lazily.

    Entries are appended to a buffer of 4 * kept per query and cut back to the best `kept` only when it
    fills, so a merge (an `argpartition`) runs once per ~3 kept new entries per query, not once per block.

    Args:
        count: number of queries.
        kept: entries to keep per query.
    """

    def __init__(self, count, kept):
        self.kept = kept
        self.values = np.full((count, 4 * kept), -np.inf, np.float32)
        self.slots = np.zeros((count, 4 * kept), np.int64)
        self.fill = np.zeros(count, np.int64)
        # A lower bound of each query's final kept-th value: nothing below it can enter.
        self.bound = np.full(count, -np.inf, np.float32)

    def raise_bound(self, bound):
        self.bound = np.maximum(self.bound, bound)

    def add(self, rows, values, slots):
        """Appends entries of queries `rows` (ascending) with their `values` and `slots`."""
        counts = np.bincount(rows, minlength=len(self.fill))
        if (self.fill + counts).max() > self.values.shape[1]:
            self._cut()
            width = int((self.fill + counts).max())
            if width > self.values.shape[1]:
                more = width + self.kept - self.values.shape[1]
                self.values = np.pad(self.values, ((0, 0), (0, more)), constant_values=-np.inf)
                self.slots = np.pad(self.slots, ((0, 0), (0, more)))
        at = self.fill[rows] + np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        self.values[rows, at] = values
        self.slots[rows, at] = slots
        self.fill += counts

    def _cut(self):
        """Keeps the best `kept` entries of each query and raises the bound to the kept-th of them."""
        width = int(self.fill.max())
        if width <= self.kept:
            return
        keep = np.argpartition(-self.values[:, :width], self.kept - 1, axis=1)[:, : self.kept]
        values = np.take_along_axis(self.values, keep, axis=1)
        self.slots[:, : self.kept] = np.take_along_axis(self.slots, keep, axis=1)
        self.values[:, : self.kept] = values
        self.values[:, self.kept : width] = -np.inf
        self.fill = np.minimum(self.fill, self.kept)
        self.raise_bound(values.min(axis=1))

    def best(self, k):
        """(values (Q, kept), slots (Q, kept)) with the k best first (unordered: a partition, not a sort);
        -inf where a query has fewer entries."""
        self._cut()
        values, slots = self.values[:, : self.kept], self.slots[:, : self.kept]
        if k < self.kept:
            order = np.argpartition(-values, k - 1, axis=1)
            values, slots = np.take_along_axis(values, order, axis=1), np.take_along_axis(slots, order, axis=1)
        return values, slots


def kth_largest(values, ks):
    """For each k in `ks`, the k-th largest value of each row of `values` (Q, n) (-inf when n < k)."""
    inside = [k - 1 for k in ks if k <= values.shape[1]]
    ordered = -np.partition(-values, inside, axis=1) if inside else values
    return [ordered[:, k - 1] if k <= values.shape[1] else np.full(len(values), -np.inf, np.float32) for k in ks]


def above(values, group_max, threshold):
    """The finite entries of each row of `values` at or above that row's `threshold`.

    Group maxima (computed with the product) find the groups that hold them, so the host compares
    `block / GROUP` maxima and reads a few groups instead of the whole block. Removed anchors and
    padding score -inf and never pass.

    Returns:
        (rows int64 (n,) ascending, values float32 (n,), columns int64 (n,)).
    """
    hits = np.flatnonzero(group_max >= threshold[:, None])
    rows, groups = np.divmod(hits, group_max.shape[1])
    grouped = np.take(values.reshape(-1, GROUP), hits, axis=0)
    inside = np.flatnonzero((grouped >= threshold[rows, None]) & (grouped > -np.inf))
    which, position = np.divmod(inside, GROUP)
    return rows[which], grouped.ravel()[inside], groups[which] * GROUP + position
