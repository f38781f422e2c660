"""RefinedIndex: int8 screening plus float32 rescoring equals a dense float32 top-k, certified."""

import mmap

import numpy as np
import pytest

from keras_clip_it.collections import AnalogyCollection
from keras_clip_it.collections.storage import open_collection, save_collection
from keras_clip_it.search import AnchorIndex
from keras_clip_it.search import RefinedIndex
from tests.helpers import dense_topk, unit


def memory_mapped(array):
    """Whether `array`'s memory is a file mapping (np.asarray of a memmap drops the subclass, not the map)."""
    while array is not None:
        if isinstance(array, (np.memmap, mmap.mmap)):
            return True
        array = getattr(array, "base", None)
    return False


def assert_exact(got, queries, anchors, k):
    """Same rows as the dense float32 top-k, except where the two scores tie to float32 rounding."""
    (values, rows), (want_values, want_rows) = got, dense_topk(queries, anchors, k)
    np.testing.assert_allclose(values, want_values, atol=1e-6)
    scores = queries @ anchors.T
    sorted_scores = -np.sort(-scores, axis=1)
    # A query's row sets may differ only where its k-th and (k+1)-th scores are within rounding.
    gap = sorted_scores[:, k - 1] - sorted_scores[:, k] if k < anchors.shape[0] else np.full(len(queries), 1.0)
    clear = gap > 1e-6
    assert clear.mean() > 0.5
    for want, got_rows in zip(want_rows[clear], rows[clear]):
        assert set(want.tolist()) == set(got_rows.tolist())
    # Within the top k, the order can swap only between scores equal to rounding.
    np.testing.assert_allclose(np.take_along_axis(scores, rows, axis=1), want_values, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 800])
def test_certified_topk_equals_dense_float32(seed, k):
    rng = np.random.default_rng(seed)
    # Random unit vectors: the hardest case, where plain int8 disagrees with float32 on the nearest anchor.
    anchors, queries = unit(rng.standard_normal((20000, 96))), unit(rng.standard_normal((40, 96)))
    int8 = AnchorIndex(anchors, dtype="int8")
    refined = RefinedIndex(int8, anchors)
    got = refined.topk(queries, k, batch_size=16)
    assert_exact(got, queries, anchors, k)
    if k == 1:
        # A few rows per query are read, not the collection.
        assert refined.rows_read < 40 * 200
    assert refined.queries_answered == 40
    # A second search starts from the width the first one learned, with the same results.
    again = refined.topk(queries, k)
    np.testing.assert_array_equal(again[1], got[1])


def test_refinement_fixes_what_plain_int8_gets_wrong():
    rng = np.random.default_rng(8)
    anchors, queries = unit(rng.standard_normal((20000, 384))), unit(rng.standard_normal((300, 384)))
    int8 = AnchorIndex(anchors, dtype="int8")
    want = dense_topk(queries, anchors, 1)[1][:, 0]
    plain = int8.topk(queries, 1)[1][:, 0]
    assert (plain != want).sum() >= 2
    np.testing.assert_array_equal(RefinedIndex(int8, anchors).topk(queries, 1)[1][:, 0], want)


def test_near_anchor_queries_and_whole_collection():
    rng = np.random.default_rng(3)
    anchors = unit(rng.standard_normal((3000, 64)))
    queries = unit(anchors[:25] + 0.3 * unit(rng.standard_normal((25, 64))))
    refined = RefinedIndex(AnchorIndex(anchors, dtype="int8"), anchors)
    values, rows = refined.topk(queries, 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(25))
    assert_exact(refined.topk(queries, 3000), queries, anchors, 3000)


def test_memmap_rows_of_a_stored_collection(tmp_path):
    rng = np.random.default_rng(4)
    anchors, queries = unit(rng.standard_normal((5000, 48))), unit(rng.standard_normal((30, 48)))
    collection = AnalogyCollection()
    collection.add([f"pair-{i}" for i in range(len(anchors))], embeddings={"image": {"enc": anchors}})
    save_collection(collection, tmp_path / "col")
    opened = open_collection(tmp_path / "col").embeddings("image", "enc")
    assert memory_mapped(opened)
    refined = RefinedIndex(AnchorIndex(opened, dtype="int8"), opened)
    assert_exact(refined.topk(queries, 50), queries, anchors, 50)
    assert 0 < refined.rows_read < 30 * 5000 // 4


def test_resident_bytes():
    rng = np.random.default_rng(5)
    for dim in (384, 1280):
        anchors = unit(rng.standard_normal((4096, dim)))
        refined = RefinedIndex(AnchorIndex(anchors, dtype="int8"), anchors)
        # Codes (1 byte per dim), scale and residual norm (float32 each) per anchor, and the float32 rows
        # (and row numbers) of the 4 anchors with the largest residuals.
        assert refined.nbytes == 4096 * (dim + 8) + 4 * (4 * dim + 8)
        assert refined.nbytes / anchors.nbytes <= 0.26
        np.testing.assert_array_equal(np.sort(np.argsort(-refined.residual_norms)[:4]), refined.outliers)
        assert refined.max_residual == np.sort(refined.residual_norms)[-5]
        # In memory the int8 codes are also the screening blocks: beyond what is stored, the index keeps
        # a mask per slot, the spare rows (1/16 and 1,024 more) and the spare block for appends.
        index, full = refined.index, AnchorIndex(anchors)
        assert index._blocks[0][0].unsafe_buffer_pointer() == index._store.values[0].ctypes.data
        spare_rows = 4096 // 16 + 1024 + index.block
        assert refined.resident_nbytes <= refined.nbytes + 4096 * 4 + spare_rows * (dim + 4) + 512
        assert full.resident_nbytes >= anchors.nbytes + 4096 * (2 * dim + 4)


def test_bad_exact_rows_are_refused_with_what_to_do():
    rng = np.random.default_rng(6)
    anchors = unit(rng.standard_normal((100, 16)))
    index = AnchorIndex(anchors, dtype="int8")
    with pytest.raises(ValueError, match=r"shape \(99, 16\).*100 anchors of 16 dims"):
        RefinedIndex(index, anchors[:99])
    with pytest.raises(ValueError, match=r"shape \(100, 8\)"):
        RefinedIndex(index, anchors[:, :8])
    with pytest.raises(ValueError, match="must be float32, got float64"):
        RefinedIndex(index, anchors.astype(np.float64))
    with pytest.raises(TypeError, match="array-like with shape"):
        RefinedIndex(index, anchors.tolist())
    with pytest.raises(TypeError, match="must be an AnchorIndex"):
        RefinedIndex(anchors, anchors)
    refined = RefinedIndex(index, anchors)
    with pytest.raises(ValueError, match=r"queries must be \(Q, 16\)"):
        refined.topk(anchors[:, :8], 1)
    with pytest.raises(ValueError, match="k must be between 1 and the number of anchors"):
        refined.topk(anchors[:2], 101)


def test_rows_other_than_the_indexed_ones_still_give_their_exact_topk():
    # The bound holds for any rows: codes of other anchors only make the search read more.
    rng = np.random.default_rng(7)
    anchors, queries = unit(rng.standard_normal((2000, 32))), unit(rng.standard_normal((10, 32)))
    moved = unit(anchors + 0.05 * rng.standard_normal(anchors.shape).astype(np.float32))
    refined = RefinedIndex(AnchorIndex(anchors, dtype="int8"), moved)
    assert_exact(refined.topk(queries, 5), queries, moved, 5)
