"""How anchors are stored (float32, float16, int8 codes with per-row scales) and rounded for screening."""

import math

import numpy as np

DTYPES = ("float32", "float16", "int8")


def compress(anchors, dtype, chunk=65536):
    """Anchors as stored: float32, float16, or int8 codes with per-row float32 scales.

    int8 codes round each row on a grid of its max |value| / 127; the row's scale is then the least-squares
    one for those codes (c.a / c.c, never larger in squared error than the grid step), which leaves the
    error orthogonal to the stored vector. For a query close to an anchor (the nearest anchors are the
    ones ASIF keeps) the score error is then second order in the rounding error instead of first order
    (docs/asif.md measures the agreement with float32). Rows are done `chunk` at a time to bound the
    temporaries.
    """
    if dtype == "float32":
        return np.ascontiguousarray(anchors), None
    if dtype == "float16":
        return anchors.astype(np.float16), None
    codes = np.empty(anchors.shape, np.int8)
    scales = np.empty(len(anchors), np.float32)
    for start in range(0, len(anchors), chunk):
        rows = anchors[start : start + chunk]
        step = np.abs(rows).max(axis=1) / 127.0
        rounded = np.clip(np.rint(rows / np.where(step > 0, step, 1.0)[:, None]), -127, 127)
        codes[start : start + chunk] = rounded
        norm = np.einsum("ij,ij->i", rounded, rounded)
        scales[start : start + chunk] = np.einsum("ij,ij->i", rounded, rows) / np.where(norm > 0, norm, 1.0)
    scales[scales == 0] = 1.0
    return codes, scales


def decompress(stored, scales):
    values = np.asarray(stored, dtype=np.float32)
    return values if scales is None else values * scales[:, None]


def screen_bfloat16(values, out, chunk=256):
    """Writes float32 `values` (n, D) rounded to bfloat16 into `out`; returns the certificate's error terms.

    Rounds half away from zero on the bit pattern (two integer operations; to-nearest-even would take
    five and changes nothing the certificate needs, since the residual is measured). `chunk` rows at a
    time, so every intermediate stays in cache.

    Returns:
        (largest row norm of the rounding residual, largest row norm of `values`).
    """
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    out = out.view(np.uint16)
    rounded = np.empty((min(chunk, len(bits)), bits.shape[1]), np.uint32)
    residual = np.empty(rounded.shape, np.float32)
    worst = largest = 0.0
    for start in range(0, len(bits), chunk):
        part = bits[start : start + chunk]
        kept, error = rounded[: len(part)], residual[: len(part)]
        np.add(part, 0x8000, out=kept)
        kept &= 0xFFFF0000
        exact = part.view(np.float32)
        np.subtract(exact, kept.view(np.float32), out=error)
        worst = max(worst, float(np.einsum("ij,ij->i", error, error).max()))
        largest = max(largest, float(np.einsum("ij,ij->i", exact, exact).max()))
        np.right_shift(kept, 16, out=kept)
        out[start : start + len(part)] = kept
    return math.sqrt(worst), math.sqrt(largest)


def max_row_norm(values):
    return math.sqrt(float(np.einsum("ij,ij->i", values, values).max())) if len(values) else 0.0
