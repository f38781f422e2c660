"""Where the anchors live: stored segments, screening blocks with free slots, aligned host memory.

Shared by an index and the indexes derived from it by changes, so that a change costs O(rows changed):
writers claim the slots after their own and copy only when another change wrote there first.
"""

import bisect
import threading
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from keras_clip_it.collections.memory import prefault


class Block(NamedTuple):
    """One screening block of an index: what its product reads on the device, and where it sits.

    Attributes:
        values: (block, D) device array, bfloat16 values or int8 codes.
        scales: (block,) float32 device array (1 for bfloat16 values).
        bias: (block,) float32 device array, 0 for live anchors, -inf for removed ones and free slots.
        offset: first slot of the block.
        filled: slots written, from `offset`.
        host: (`Partial`, host bias) while the block has free slots that appends can fill, else None.
        plain: a full block of live bfloat16 anchors, whose product needs neither scales nor bias.
    """

    values: object
    scales: object
    bias: object
    offset: int
    filled: int
    host: object
    plain: bool


class Store:
    """Stored anchors in slots, as segments: appends fill the last segment's spare rows, then add one.

    Nothing stored is ever copied to make room, so an append costs O(appended rows). Shared by an
    index and the indexes derived from it: an index reads only its own first slots, so writing after
    them never changes what an existing index sees. When a derived index already wrote there (two
    changes made from the same index), the writer gets its own copy instead.
    """

    def __init__(self, values, scales, used):
        self.values, self.scales, self.starts, self.used = [values], None if scales is None else [scales], [0], used
        self.lock = threading.Lock()

    @property
    def itemsize(self):
        return self.values[0].itemsize

    def pieces(self, lo, hi):
        """Slots [lo, hi) as views, one per segment: [(first slot, values, scales or None)]."""
        out = []
        for number, start in enumerate(list(self.starts)):
            values = self.values[number]
            a, b = max(lo, start), min(hi, start + len(values))
            if a < b:
                scales = None if self.scales is None else self.scales[number][a - start : b - start]
                out.append((a, values[a - start : b - start], scales))
        return out

    def aligned(self, rows):
        """This store, or a copy whose first segment is aligned (`aligned_zeros`) with room for `rows` slots."""
        values, scales = self.values[0], None if self.scales is None else self.scales[0]
        if len(self.values) == 1 and len(values) >= rows and is_aligned(values) and (scales is None or is_aligned(scales)):
            return self
        used_values, used_scales = self.slice(0, self.used)
        values = aligned_zeros((rows,) + values.shape[1:], values.dtype)
        values[: self.used] = used_values
        if scales is not None:
            scales = aligned_zeros(rows, np.float32)
            scales[: self.used] = used_scales
        return Store(values, scales, self.used)

    def block_view(self, offset, rows):
        """(values, scales) views of slots [offset, offset + rows) when the first segment holds them aligned
        (for a zero-copy placement on the device), else None."""
        values, scales = self.values[0][offset : offset + rows], None if self.scales is None else self.scales[0][offset : offset + rows]
        if len(values) < rows or not is_aligned(values) or scales is None or not is_aligned(scales):
            return None
        return values, scales

    def slice(self, lo, hi):
        """Slots [lo, hi) -> (values, scales or None): a view when they lie in one segment."""
        pieces = self.pieces(lo, hi)
        if len(pieces) == 1:
            return pieces[0][1:]
        scales = None if self.scales is None else np.concatenate([p[2] for p in pieces])
        return np.concatenate([p[1] for p in pieces]), scales

    def take(self, slots):
        """Rows at `slots` (int array of any shape) -> (values, scales or None), gathered."""
        used = bisect.bisect_left(self.starts, self.used)  # segments holding rows; the others are spare
        values, scales = self.values[:used], None if self.scales is None else self.scales[:used]
        if len(values) == 1:
            # `np.take` gathers rows faster than fancy indexing.
            return np.take(values[0], slots, axis=0), None if scales is None else np.take(scales[0], slots)
        starts = np.asarray(self.starts[: len(values)])
        segment = np.searchsorted(starts, slots, side="right") - 1
        out = np.empty(slots.shape + values[0].shape[1:], values[0].dtype)
        out_scales = None if scales is None else np.empty(slots.shape, np.float32)
        for number in np.unique(segment).tolist():
            inside = segment == number
            out[inside] = values[number][slots[inside] - starts[number]]
            if scales is not None:
                out_scales[inside] = scales[number][slots[inside] - starts[number]]
        return out, out_scales

    @property
    def capacity(self):
        return self.starts[-1] + len(self.values[-1])

    def reserve(self, rows):
        """Adds a segment of `rows` spare slots, its pages mapped in the background."""
        values = np.empty((rows,) + self.values[0].shape[1:], self.values[0].dtype)
        scales = None if self.scales is None else np.empty(rows, np.float32)
        prefault(values)
        if scales is not None:
            prefault(scales)
        self.starts.append(self.capacity)
        self.values.append(values)
        if scales is not None:
            self.scales.append(scales)

    def write(self, at, stored, scales):
        """Writes rows at slot `at` onward; returns the store now holding them (this one or a copy).

        When fewer spare slots remain than were just written, a segment of 1/16 of the anchors is
        reserved for the next changes and mapped ahead (`memory.prefault`), so that the next append of
        a similar size writes into memory the system has already mapped.
        """
        with self.lock:
            # Slots below `at` never change: a second writer may share them, not what follows.
            target = self if self.used == at else Store(*self.slice(0, at), used=at)
            count = len(stored)
            if target.capacity < at + count:
                target.reserve(at + count - target.capacity + (at + count) // 16 + 1024)
            for first, values, part_scales in target.pieces(at, at + count):
                values[...] = stored[first - at : first - at + len(values)]
                if scales is not None:
                    part_scales[...] = scales[first - at : first - at + len(values)]
            target.used = at + count
            if target.capacity - target.used < count:
                target.reserve(count + target.used // 16 + 1024)
            return target


class SpareBlock:
    """The host arrays of one screening block, allocated (and mapped in the background) before a change
    needs a new block; shared by an index and the indexes derived from it, the first change takes it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.arrays = None

    def take(self, block, dim, codes):
        """(values, scales) zeros for a new block: the prepared ones if they fit, else new ones."""
        with self.lock:
            arrays, self.arrays = self.arrays, None
        if arrays is None or arrays[0].shape != (block, dim) or (arrays[0].dtype == np.int8) != codes:
            arrays = aligned_zeros((block, dim), np.int8 if codes else jnp.bfloat16), aligned_zeros(block, np.float32)
        return arrays

    def prepare(self, block, dim, codes):
        with self.lock:
            if self.arrays is not None:
                return
            self.arrays = aligned_zeros((block, dim), np.int8 if codes else jnp.bfloat16), aligned_zeros(block, np.float32)
            for array in self.arrays:
                prefault(array)


class Partial:
    """The host arrays of a block with free slots, and how far changes have written into them.

    Shared by an index and the indexes derived from it, like `Store`: each one's bias masks the slots
    after its own, so rows written there change nothing it computes. `shared` tells whether the device
    arrays are these very arrays (one CPU device): rows written here are then on the device as well.

    Args:
        values: (block, D) bfloat16 values or int8 codes, zero in unwritten slots.
        scales: (block,) float32 scales.
        written: slots [0, written) that the creating change writes.
    """

    def __init__(self, values, scales, written):
        self.values, self.scales = values, scales
        self.written = written
        self.shared = False
        self.lock = threading.Lock()

    def claim(self, lo, hi):
        """Takes slots [lo, hi) for one change if no other change wrote from `lo` on; tells whether it did."""
        with self.lock:
            if self.written != lo:
                return False
            self.written = hi
            return True

    def copy(self, written):
        """An unshared copy, for a change whose slots another change already wrote."""
        return Partial(aligned_copy(self.values), aligned_copy(self.scales), written)


def aligned_zeros(shape, dtype, alignment=64):
    """Zeros whose data start on an `alignment`-byte boundary, so `to_device` can place them without a copy.

    Large ones come from calloc: their pages are mapped when first written, not now.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + alignment, np.uint8)
    skip = -raw.ctypes.data % alignment
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


def is_aligned(array, alignment=64):
    return array.ctypes.data % alignment == 0


def aligned_copy(array):
    array = np.asarray(array)
    out = aligned_zeros(array.shape, array.dtype)
    out[...] = array
    return out


def aligned_full(count, value):
    out = aligned_zeros(count, np.float32)
    out[:] = value
    return out
