"""AnchorIndex (search/exact.py): screened, blocked, compressed and sharded searches equal a dense numpy top-k."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_clip_it.search import AnchorIndex
from tests.helpers import dense_topk, unit


def dequantised(index):
    values = index.stored.astype(np.float32)
    return values if index.scales is None else values * index.scales[:, None]


def assert_same_topk(got, want, anchors, queries, atol=2e-6, same_rows=0.99):
    (values, rows), (want_values, want_rows) = got, want
    np.testing.assert_allclose(values, want_values, atol=atol)
    # Rows may differ only where two anchors tie to float32 rounding: their exact scores match.
    np.testing.assert_allclose(np.einsum("qkd,qd->qk", anchors[rows], queries), want_values, atol=atol)
    assert np.mean(rows == want_rows) >= same_rows


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_blocked_screened_search_equals_dense_numpy(dtype):
    rng = np.random.default_rng(0)
    anchors, queries = unit(rng.standard_normal((5000, 40))), unit(rng.standard_normal((23, 40)))
    index = AnchorIndex(anchors, dtype=dtype, block=512)
    assert len(index._blocks) == 10
    exact = dequantised(index)
    want = dense_topk(queries, exact, 64)
    assert_same_topk(index.topk(queries, 64, batch_size=8), want, exact, queries)
    assert_same_topk(index.dense_topk(queries, 64, batch_size=8), want, exact, queries)


def test_compressed_storage_sizes_and_error():
    rng = np.random.default_rng(1)
    anchors = unit(rng.standard_normal((1000, 256)))
    sizes = {dtype: AnchorIndex(anchors, dtype=dtype).nbytes for dtype in ("float32", "float16", "int8")}
    assert sizes["float16"] == sizes["float32"] // 2
    assert sizes["int8"] == 1000 * (256 + 4)
    index = AnchorIndex(anchors, dtype="int8")
    error = dequantised(index) - anchors
    # Codes on the max-abs grid; the scale is the least-squares one for them: the error is orthogonal to
    # the stored vector and never larger than with the grid step as the scale.
    codes = index.stored.astype(np.float32)
    np.testing.assert_array_equal(codes, np.rint(anchors / (np.abs(anchors).max(axis=1, keepdims=True) / 127)))
    cosine = np.einsum("ij,ij->i", error, codes) / np.linalg.norm(error, axis=1) / np.linalg.norm(codes, axis=1)
    assert np.abs(cosine).max() < 1e-3
    grid_error = codes * (np.abs(anchors).max(axis=1, keepdims=True) / 127) - anchors
    assert np.all((error**2).sum(axis=1) <= (grid_error**2).sum(axis=1) + 1e-9)
    assert np.all(np.abs(error).max(axis=1) <= 2 * np.abs(anchors).max(axis=1) / 254)


def test_uncertified_queries_fall_back_to_the_exact_path(monkeypatch):
    # Many anchors tie at the k-th score: no margin can separate them, the certificate must fail.
    rng = np.random.default_rng(2)
    base = unit(rng.standard_normal((1, 32)))
    anchors = np.concatenate([np.repeat(base, 300, axis=0), unit(rng.standard_normal((700, 32)))])
    anchors[:300] = unit(anchors[:300] + 1e-4 * rng.standard_normal((300, 32)))
    queries = unit(base + 0.01 * rng.standard_normal((4, 32)))
    index = AnchorIndex(anchors, block=128)
    fallbacks = []
    plain = index.dense_topk
    monkeypatch.setattr(index, "dense_topk", lambda q, k: fallbacks.append(len(q)) or plain(q, k))
    want = dense_topk(queries, anchors, 50)
    # 300 near-duplicates: the order among them is float32 noise, their scores are what must match.
    assert_same_topk(index.topk(queries, 50, margin=8), want, anchors, queries, same_rows=0.0)
    assert fallbacks == [4]


def test_k_equal_to_the_collection_and_bad_arguments():
    rng = np.random.default_rng(3)
    anchors, queries = unit(rng.standard_normal((30, 8))), unit(rng.standard_normal((2, 8)))
    index = AnchorIndex(anchors)
    assert_same_topk(index.topk(queries, 30), dense_topk(queries, anchors, 30), anchors, queries)
    with pytest.raises(ValueError, match="k must be between 1"):
        index.topk(queries, 31)
    with pytest.raises(ValueError, match=r"queries must be \(Q, 8\)"):
        index.topk(np.ones((2, 9)), 3)
    with pytest.raises(ValueError, match="dtype"):
        AnchorIndex(anchors, dtype="int4")


SHARDED = r"""
import json, sys
import jax, numpy as np
from keras_clip_it.search import AnchorIndex
assert len(jax.devices()) == 4, jax.devices()
rng = np.random.default_rng(4)
anchors = rng.standard_normal((3000, 24)).astype("float32")
anchors /= np.linalg.norm(anchors, axis=1, keepdims=True)
queries = anchors[:5] + 0.3 * rng.standard_normal((5, 24)).astype("float32")
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("anchors",))
out = {}
for dtype in ("float32", "int8"):
    one = AnchorIndex(anchors, dtype=dtype, block=512).topk(queries, 40)
    four = AnchorIndex(anchors, dtype=dtype, block=512, mesh=mesh)
    shards = {str(s.device) for s in four._blocks[0][0].addressable_shards}
    got = four.topk(queries, 40)
    out[dtype] = {"shards": len(shards), "same_rows": bool((got[1] == one[1]).all()),
                  "max_diff": float(np.abs(got[0] - one[0]).max())}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_sharded_over_four_devices_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for dtype in ("float32", "int8"):
        assert result[dtype]["shards"] == 4
        assert result[dtype]["same_rows"] and result[dtype]["max_diff"] == 0.0, result


def mirrored(anchors, changes):
    """Applies ("add", array) / ("remove", rows) to a plain array, renumbering as AnalogyCollection does."""
    from keras_clip_it.collections.analogy_collection import removal_moves

    anchors = anchors.copy()
    for change, value in changes:
        if change == "add":
            anchors = np.concatenate([anchors, value])
        else:
            drop = np.unique(value)
            holes, movers = removal_moves(len(anchors), drop)
            anchors[holes] = anchors[movers]
            anchors = anchors[: len(anchors) - drop.size]
    return anchors


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_appends_and_removals_equal_a_rebuild_and_leave_the_old_index_alone(dtype):
    rng = np.random.default_rng(5)
    anchors, queries = unit(rng.standard_normal((2000, 24))), unit(rng.standard_normal((11, 24)))
    changes = [
        ("add", unit(rng.standard_normal((300, 24)))),  # fills the partial last block, then a new one
        ("remove", rng.choice(2300, 150, replace=False)),
        ("add", unit(rng.standard_normal((40, 24)))),
        ("remove", np.arange(2150, 2190)),  # exactly the last rows: nothing moves
        ("remove", rng.choice(2150, 60, replace=False)),
    ]
    first = AnchorIndex(anchors, dtype=dtype, block=256)
    # Full blocks of live bfloat16 anchors are screened by their product alone (no scales, no bias).
    plain = [entry[6] for entry in first._blocks]
    assert plain == ([True] * 7 + [False] if dtype == "float32" else [False] * 8)
    before = first.topk(queries, 40)
    index = first
    for change, value in changes:
        index = index.append(value) if change == "add" else index.remove(value)
        if change == "remove":
            # A block that lost anchors masks them: it is screened with its bias from then on.
            masked = np.flatnonzero(index._row_of_slot < 0) // 256
            assert masked.size and not any(index._blocks[number][6] for number in masked.tolist())
    final = mirrored(anchors, changes)
    rebuilt = AnchorIndex(final, dtype=dtype, block=256)
    assert index.size == rebuilt.size == len(final) == 2090
    assert index._slots == 2340  # removed anchors are masked, not moved: nothing was compacted
    np.testing.assert_array_equal(index.stored, rebuilt.stored)
    for search in ("topk", "dense_topk"):
        got, want = getattr(index, search)(queries, 40), getattr(rebuilt, search)(queries, 40)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    assert_same_topk(index.topk(queries, 40), dense_topk(queries, dequantised(rebuilt), 40), dequantised(rebuilt), queries)
    np.testing.assert_allclose(index.exact_scores(queries, want[1]), want[0], atol=2e-6)
    # The first index still answers for the anchors it was built on.
    again = first.topk(queries, 40)
    np.testing.assert_array_equal(again[1], before[1])
    assert first.size == 2000


def test_two_changes_from_one_index_do_not_overwrite_each_other():
    rng = np.random.default_rng(8)
    anchors, queries = unit(rng.standard_normal((700, 16))), unit(rng.standard_normal((5, 16)))
    left, right = unit(rng.standard_normal((90, 16))), unit(rng.standard_normal((90, 16)))
    base = AnchorIndex(anchors, block=128).append(left[:30])  # a segment with spare rows after it
    one, two = base.append(left[30:]), base.append(right)  # the second writes where the first did
    for index, added in ((one, left), (two, np.concatenate([left[:30], right]))):
        full = np.concatenate([anchors, added])
        np.testing.assert_array_equal(index.stored, full)
        np.testing.assert_array_equal(index.topk(queries, 12)[1], dense_topk(queries, full, 12)[1])


def test_many_removals_compact_and_a_small_index_grows_its_blocks():
    rng = np.random.default_rng(6)
    anchors, queries = unit(rng.standard_normal((3000, 16))), unit(rng.standard_normal((5, 16)))
    index = AnchorIndex(anchors, block=256)
    drop = rng.choice(3000, 1000, replace=False)
    index = index.remove(drop)
    # A third of the slots masked is more than a quarter of the live anchors: laid out again, dense.
    assert index._slots == index.size == 2000 and index._row_of_slot is None
    final = mirrored(anchors, [("remove", drop)])
    np.testing.assert_array_equal(index.topk(queries, 20)[1], dense_topk(queries, final, 20)[1])
    small = AnchorIndex(anchors[:40], block=256)
    assert small.block == 48
    grown = small.append(anchors[40:1000])
    assert grown.block == 256 and grown.size == 1000
    np.testing.assert_array_equal(grown.topk(queries, 20)[1], dense_topk(queries, anchors[:1000], 20)[1])
    with pytest.raises(ValueError, match=r"rows to remove must be in \[0, 1000\)"):
        grown.remove([1000])
    with pytest.raises(ValueError, match=r"anchors to append must be \(n, 16\)"):
        grown.append(np.ones((2, 15), np.float32))


def test_queries_during_changes_see_one_published_index():
    """Readers search whatever index is published while a writer appends and removes: every answer is
    the exact answer for one of the published indexes, never a mix of two."""
    import threading

    rng = np.random.default_rng(7)
    anchors, queries = unit(rng.standard_normal((1500, 16))), unit(rng.standard_normal((4, 16)))
    published = [AnchorIndex(anchors, block=128)]
    states = [anchors]
    changes = []
    for step in range(12):
        if step % 2 == 0:
            changes.append(("add", unit(rng.standard_normal((50, 16)))))
        else:
            changes.append(("remove", rng.choice(1500, 40, replace=False)))
    answers, errors, done = [], [], threading.Event()

    def reader():
        try:
            while not done.is_set():
                number = len(published) - 1
                answers.append((number, published[number].topk(queries, 10)))
        except Exception as error:  # reported below, a thread cannot fail the test itself
            errors.append(error)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for change, value in changes:
        index = published[-1]
        published.append(index.append(value) if change == "add" else index.remove(value))
        states.append(mirrored(states[-1], [(change, value)]))
    done.set()
    for thread in threads:
        thread.join()
    assert not errors and len(answers) >= 2
    for number, (values, rows) in answers:
        want_values, want_rows = dense_topk(queries, states[number], 10)
        np.testing.assert_allclose(values, want_values, atol=2e-6)
        np.testing.assert_array_equal(rows, want_rows)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_appends_write_the_last_block_in_place_and_a_second_change_copies_it(dtype):
    rng = np.random.default_rng(9)
    anchors, queries = unit(rng.standard_normal((1000, 16))), unit(rng.standard_normal((6, 16)))
    base = AnchorIndex(anchors, dtype=dtype, block=256)
    assert base._blocks[-1][4] == 1000 - 3 * base.block  # a partial last block
    before = base.topk(queries, 20)
    first, second = unit(rng.standard_normal((10, 16))), unit(rng.standard_normal((10, 16)))
    one = base.append(first)
    # One CPU device: the device block is the host array, so only the new rows were written.
    assert one._blocks[-1][0] is base._blocks[-1][0] and one._blocks[-1][2] is not base._blocks[-1][2]
    two = base.append(second)  # the same free slots again: this change gets its own copy of the block
    assert two._blocks[-1][0] is not base._blocks[-1][0]
    for index, added in ((one, first), (two, second), (base, anchors[:0])):
        full = np.concatenate([anchors, added])
        rebuilt = AnchorIndex(full, dtype=dtype, block=256)
        got, want = index.topk(queries, 20), rebuilt.topk(queries, 20)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(base.topk(queries, 20)[1], before[1])


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_many_small_changes_equal_a_rebuild(dtype):
    """Appends that fill blocks, spill into prepared spare blocks and store segments, with removals between."""
    rng = np.random.default_rng(10)
    anchors, queries = unit(rng.standard_normal((700, 12))), unit(rng.standard_normal((9, 12)))
    index, changes, size = AnchorIndex(anchors, dtype=dtype, block=128), [], 700
    first = index
    for step in range(30):
        if step % 3 == 2:
            change = ("remove", rng.choice(size, 15, replace=False))
            size -= 15
        else:
            change = ("add", unit(rng.standard_normal((int(rng.integers(20, 90)), 12))))
            size += len(change[1])
        changes.append(change)
        index = index.append(change[1]) if change[0] == "add" else index.remove(change[1])
    final = mirrored(anchors, changes)
    rebuilt = AnchorIndex(final, dtype=dtype, block=index.block)
    # Appends spilled past the first segment (int8's first one has room up to its last block's end).
    assert index.size == len(final) and len(index._store.values) >= 2
    np.testing.assert_array_equal(index.stored, rebuilt.stored)
    got, want = index.topk(queries, 25), rebuilt.topk(queries, 25)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    assert_same_topk(got, dense_topk(queries, dequantised(rebuilt), 25), dequantised(rebuilt), queries)
    np.testing.assert_array_equal(first.topk(queries, 25)[1], AnchorIndex(anchors, dtype=dtype, block=128).topk(queries, 25)[1])
