"""Compression helpers: bfloat16 screening copies and their measured rounding error."""

import ml_dtypes
import numpy as np
import pytest

from keras_clip_it.search.compression import screen_bfloat16


def test_screening_rounds_to_bfloat16_and_measures_its_error():
    rng = np.random.default_rng(11)
    values = rng.standard_normal((1000, 40)).astype(np.float32)
    out = np.zeros((1000, 40), ml_dtypes.bfloat16)
    residual, norm = screen_bfloat16(values, out, chunk=96)
    rounded = out.astype(np.float32)
    # Within half a unit in the last place of bfloat16 (8 significant bits), as the nearest value is.
    assert np.all(np.abs(rounded - values) <= np.abs(values) * 2.0**-8)
    assert np.mean(rounded == values.astype(ml_dtypes.bfloat16).astype(np.float32)) > 0.999
    assert residual == pytest.approx(np.linalg.norm(values - rounded, axis=1).max(), rel=1e-6)
    assert norm == pytest.approx(np.linalg.norm(values, axis=1).max(), rel=1e-6)
