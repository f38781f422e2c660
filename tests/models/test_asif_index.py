"""AnchorIndex: screened, blocked, compressed and sharded searches equal a dense numpy top-k."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_clip_it.models.asif_index import AnchorIndex


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def dense_topk(queries, anchors, k):
    scores = queries @ anchors.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


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
    error = np.abs(dequantised(AnchorIndex(anchors, dtype="int8")) - anchors).max(axis=1)
    assert np.all(error <= np.abs(anchors).max(axis=1) / 254 + 1e-7)


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
from keras_clip_it.models.asif_index import AnchorIndex
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
