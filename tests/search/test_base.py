"""The AnchorSearch interface: every index builds, searches, changes, follows, saves and loads the same way."""

import json
import os

import numpy as np
import pytest

from keras_clip_it.collections import AnalogyCollection
from keras_clip_it.search import AnchorIndex, AnchorSearch, RefinedIndex, follow
from tests.helpers import dense_topk, unit

# Every implementation, with the options that make a small test take several blocks.
SEARCHES = [
    pytest.param(lambda anchors: AnchorIndex.build(anchors, block=256), id="exact-float32"),
    pytest.param(lambda anchors: AnchorIndex.build(anchors, dtype="int8", block=256), id="exact-int8"),
    pytest.param(lambda anchors: RefinedIndex.build(anchors, block=256), id="refined"),
]


def changed(anchors, rng):
    """A collection over `anchors`, its version, and the same collection after an add and two removals."""
    collection = AnalogyCollection()
    collection.add([f"a{i}" for i in range(len(anchors))], embeddings={"image": {"enc": anchors}})
    version = collection.version
    collection.add([f"b{i}" for i in range(300)], embeddings={"image": {"enc": unit(rng.standard_normal((300, 24)))}})
    collection.remove([f"a{i}" for i in rng.choice(len(anchors), 120, replace=False).tolist()])
    collection.remove([f"b{i}" for i in range(250, 300)])  # the last rows: nothing moves
    return collection, version


def test_the_interface_is_abstract_and_both_indexes_implement_it():
    with pytest.raises(TypeError, match="abstract"):
        AnchorSearch()
    anchors = unit(np.random.default_rng(0).standard_normal((600, 16)))
    for index in (AnchorIndex.build(anchors), RefinedIndex.build(anchors)):
        assert isinstance(index, AnchorSearch)
        assert (index.size, index.dim) == (600, 16) and index.resident_nbytes > anchors.nbytes // 4
        values, rows = index.topk(anchors[:3], 5)
        assert values.shape == rows.shape == (3, 5) and rows[:, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("build", SEARCHES)
def test_follow_equals_a_rebuild_over_the_changed_collection(build):
    rng = np.random.default_rng(1)
    anchors, queries = unit(rng.standard_normal((1500, 24))), unit(rng.standard_normal((9, 24)))
    collection, version = changed(anchors, rng)
    first = build(anchors)
    before = first.topk(queries, 30)
    followed = follow(first, collection, "image", "enc", version)
    rebuilt = build(np.array(collection.embeddings("image", "enc")))
    assert followed.size == rebuilt.size == len(collection) == 1630
    got, want = followed.topk(queries, 30), rebuilt.topk(queries, 30)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    # The index followed from is unchanged.
    np.testing.assert_array_equal(first.topk(queries, 30)[1], before[1])


def test_refined_changes_stay_exact_against_float32():
    rng = np.random.default_rng(2)
    anchors, queries = unit(rng.standard_normal((3000, 32))), unit(rng.standard_normal((12, 32)))
    added = unit(rng.standard_normal((500, 32)))
    refined = RefinedIndex.build(anchors, block=512)
    resident = refined.resident_nbytes
    grown = refined.append(added)
    # The appended float32 rows are kept in memory, and counted.
    assert grown.resident_nbytes >= resident + added.nbytes
    drop = rng.choice(3500, 400, replace=False)
    shrunk = grown.remove(drop)
    from keras_clip_it.collections.analogy_collection import removal_moves

    final = np.concatenate([anchors, added])
    holes, movers = removal_moves(3500, np.unique(drop))
    final[holes] = final[movers]
    final = final[:3100]
    for k in (1, 40):
        values, rows = shrunk.topk(queries, k)
        want_values, want_rows = dense_topk(queries, final, k)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_allclose(values, want_values, atol=1e-6)
    # Outliers keep their exact rows under the new row numbers.
    np.testing.assert_array_equal(shrunk._outlier_rows, final[shrunk.outliers])
    assert shrunk.max_residual >= shrunk.residual_norms[np.setdiff1d(np.arange(3100), shrunk.outliers)].max()


@pytest.mark.parametrize("build", SEARCHES)
def test_save_and_load_give_identical_topk(build, tmp_path):
    rng = np.random.default_rng(3)
    anchors, queries = unit(rng.standard_normal((1200, 24))), unit(rng.standard_normal((7, 24)))
    index = build(anchors).append(unit(rng.standard_normal((90, 24)))).remove(rng.choice(1290, 70, replace=False))
    index.save(tmp_path / "index")
    # Only .npy files and the manifest: nothing a loader would unpickle.
    for _, _, files in os.walk(tmp_path / "index"):
        assert all(name.endswith(".npy") or name == "search.json" for name in files)
    loaded = type(index).load(tmp_path / "index")
    assert (loaded.size, loaded.dim) == (index.size, index.dim) == (1220, 24)
    for k in (1, 25):
        got, want = loaded.topk(queries, k), index.topk(queries, k)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    if isinstance(index, RefinedIndex):
        # The float32 rows stay in the saved file until read.
        assert isinstance(loaded.exact_rows, np.memmap)
        np.testing.assert_array_equal(loaded.residual_norms, index.residual_norms)
    else:
        np.testing.assert_array_equal(loaded.stored, index.stored)


def test_loading_refuses_what_is_not_a_saved_index_of_that_class(tmp_path):
    anchors = unit(np.random.default_rng(4).standard_normal((100, 8)))
    with pytest.raises(FileNotFoundError, match="no saved index"):
        AnchorIndex.load(tmp_path / "missing")
    RefinedIndex.build(anchors).save(tmp_path / "refined")
    with pytest.raises(ValueError, match="holds a saved RefinedIndex, not AnchorIndex"):
        AnchorIndex.load(tmp_path / "refined")
    AnchorIndex.build(anchors).save(tmp_path / "exact")
    manifest = json.loads((tmp_path / "exact" / "search.json").read_text())
    assert manifest["search"] == "AnchorIndex" and manifest["options"]["dtype"] == "float32"
    manifest["options"]["dtype"] = "int8"
    (tmp_path / "exact" / "search.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="do not match dtype 'int8'"):
        AnchorIndex.load(tmp_path / "exact")
