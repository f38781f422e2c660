import numpy as np
import pytest

from keras_clip_it.collections import AnalogyCollection


def _pairs(n, start=0, dim=4, seed=0):
    rng = np.random.default_rng(seed + start)
    ids = [f"p{i}" for i in range(start, start + n)]
    captions = [f"caption {i}" for i in range(start, start + n)]
    embeddings = {
        "image": {"img": rng.standard_normal((n, dim)).astype("float32")},
        "text": {"txt": rng.standard_normal((n, dim + 1)).astype("float32")},
    }
    return ids, captions, embeddings


def _filled(n=10):
    col = AnalogyCollection(name="test", language="it")
    ids, captions, embeddings = _pairs(n)
    col.add(ids, captions=captions, embeddings=embeddings, metadata=[{"i": i} for i in range(n)])
    return col, embeddings


def _state(col):
    """Rows as a dict id -> (caption, metadata, image row, text row): independent of row order."""
    image, text = col.embeddings("image", "img"), col.embeddings("text", "txt")
    return {
        i: (c, m, tuple(image[r]), tuple(text[r]))
        for r, (i, c, m) in enumerate(zip(col.ids, col.captions, col.metadata))
    }


def test_add_aligns_rows_and_bumps_version():
    col, embeddings = _filled(5)
    assert len(col) == 5 and col.version == 1
    assert col.ids == [f"p{i}" for i in range(5)]
    np.testing.assert_array_equal(col.embeddings("image", "img"), embeddings["image"]["img"])
    assert col.fingerprints == {"image": ["img"], "text": ["txt"]}
    ids, captions, more = _pairs(3, start=5)
    col.add(ids, captions=captions, embeddings=more)
    assert col.version == 2 and len(col) == 8
    np.testing.assert_array_equal(col.embeddings("text", "txt")[5:], more["text"]["txt"])
    np.testing.assert_array_equal(col.rows(["p6", "p0"]), [6, 0])


def test_duplicate_and_unknown_ids_are_named():
    col, _ = _filled(3)
    ids, captions, embeddings = _pairs(2, start=2)
    with pytest.raises(ValueError, match="'p2'"):
        col.add(ids, captions=captions, embeddings=embeddings)
    with pytest.raises(ValueError, match="'x'"):
        col.add(["x", "x"], embeddings=_pairs(2, start=50)[2])
    with pytest.raises(KeyError, match="'nope'"):
        col.remove(["p0", "nope"])
    assert len(col) == 3 and col.version == 1
    # Nothing lost: every id still finds its row, and the refused ids can be added after all.
    assert col.rows(["p0", "p1", "p2"]).tolist() == [0, 1, 2]
    with pytest.raises(KeyError, match="'p3'"):
        col.rows(["p3"])
    col.add(["p3", "x"], embeddings=_pairs(2, start=60)[2])
    assert col.rows(["x", "p2"]).tolist() == [4, 2]


def test_missing_fingerprint_error_names_encoders():
    col, _ = _filled(3)
    with pytest.raises(KeyError, match=r"embedded with image encoders \['img'\], this model uses other"):
        col.embeddings("image", "other")
    with pytest.raises(ValueError, match="pass them for the new pairs"):
        col.add(["new"], embeddings={"image": {"img": np.zeros((1, 4))}})
    with pytest.raises(ValueError, match="rows for 1 ids"):
        col.add(["new"], embeddings={"image": {"img": np.zeros((2, 4))}, "text": {"txt": np.zeros((1, 5))}})


def test_remove_then_add_equals_building_from_scratch():
    col, _ = _filled(10)
    removed = ["p1", "p8", "p9", "p4"]
    col.remove(removed)
    assert len(col) == 6 and col.version == 2
    ids, captions, embeddings = _pairs(10)
    keep = [i for i, name in enumerate(ids) if name not in removed]
    fresh = AnalogyCollection()
    fresh.add(
        [ids[i] for i in keep],
        captions=[captions[i] for i in keep],
        metadata=[{"i": i} for i in keep],
        embeddings={k: {f: a[keep] for f, a in v.items()} for k, v in embeddings.items()},
    )
    assert _state(col) == _state(fresh)
    # The ids -> rows map follows the moves.
    for row, name in enumerate(col.ids):
        assert col.rows([name])[0] == row
    # Adding the removed pairs back restores the original content.
    col.add(removed, captions=[f"caption {n[1:]}" for n in removed], metadata=[{"i": int(n[1:])} for n in removed],
            embeddings={k: {f: a[[int(n[1:]) for n in removed]] for f, a in v.items()} for k, v in embeddings.items()})
    assert _state(col) == _state(_filled(10)[0])


def test_row_order_after_remove_is_documented_swap():
    col, _ = _filled(6)
    col.remove(["p1"])
    assert col.ids == ["p0", "p5", "p2", "p3", "p4"]
    col.remove(["p3", "p4"])
    assert col.ids == ["p0", "p5", "p2"]


def test_embeddings_view_is_read_only():
    col, _ = _filled(3)
    view = col.embeddings("image", "img")
    with pytest.raises(ValueError):
        view[0, 0] = 1.0


def test_set_embeddings_and_embed_with_fake_encoders():
    class FakeText:
        fingerprint = "fake-text"

        def embed(self, texts):
            return np.array([[len(t), 1.0] for t in texts], np.float32)

    col = AnalogyCollection()
    col.add(["a", "b"], captions=["uno", "quattro"])
    col.embed(text_encoder=FakeText())
    np.testing.assert_array_equal(col.embeddings("text", "fake-text"), [[3, 1], [7, 1]])
    with pytest.raises(ValueError, match="image_refs"):
        col.embed(image_encoder=type("FakeImage", (), {"fingerprint": "fi", "embed": None})())
    with pytest.raises(ValueError, match="3 rows"):
        col.set_embeddings("image", "fi", np.zeros((3, 2)))


def test_small_changes_to_a_large_collection():
    n, dim = 200_000, 8
    rng = np.random.default_rng(0)
    col = AnalogyCollection()
    col.add([f"a{i}" for i in range(n)], embeddings={"image": {"f": rng.standard_normal((n, dim))}})
    ids = [f"b{i}" for i in range(10_000)]
    col.add(ids, embeddings={"image": {"f": np.zeros((10_000, dim))}})
    col.remove(ids)
    col.remove([f"a{i}" for i in range(0, n, 20)])
    assert len(col) == n - n // 20 and col.version == 4
    kept = [int(i[1:]) for i in col.ids]
    assert sorted(kept) == [i for i in range(n) if i % 20]
    original = rng.__class__(np.random.PCG64(0)).standard_normal((n, dim)).astype("float32")
    np.testing.assert_array_equal(col.embeddings("image", "f"), original[kept])


def test_changes_since_reports_current_rows_of_additions():
    col, _ = _filled(6)
    version = col.version
    ids, captions, embeddings = _pairs(3, start=6)
    col.add(ids, captions=captions, embeddings=embeddings)
    ids, captions, embeddings = _pairs(2, start=9)
    col.add(ids, captions=captions, embeddings=embeddings)
    # No removal since: the rows the additions were appended at.
    assert [(c, r.tolist()) for c, r in col.changes_since(version)] == [("add", [6, 7, 8]), ("add", [9, 10])]
    col.remove(["p7", "p1"])  # the last rows move into the holes in order: p9 to row 1, p10 to row 7
    assert [(c, r.tolist()) for c, r in col.changes_since(version)] == [
        ("add", [6, -1, 8]), ("add", [1, 7]), ("remove", [1, 7])
    ]
    assert col.changes_since(col.version) == []


def test_additions_copy_the_buffer_only_when_it_doubles():
    col = AnalogyCollection()
    ids, captions, embeddings = _pairs(1000, dim=8)
    col.add(ids, embeddings={"image": embeddings["image"]})
    buffer = col._embeddings[("image", "img")]
    assert len(buffer) >= 2000  # reserved, not yet written: address space, not memory
    added = [embeddings["image"]["img"]]
    for start in range(1000, 1900, 100):  # 900 rows more: no copy, the same buffer keeps filling
        ids, captions, more = _pairs(100, start=start, dim=8)
        col.add(ids, embeddings={"image": more["image"]})
        added.append(more["image"]["img"])
        assert col._embeddings[("image", "img")] is buffer
    ids, captions, more = _pairs(200, start=1900, dim=8)
    col.add(ids, embeddings={"image": more["image"]})
    added.append(more["image"]["img"])
    assert col._embeddings[("image", "img")] is not buffer and len(col._embeddings[("image", "img")]) >= 4200
    np.testing.assert_array_equal(col.embeddings("image", "img"), np.concatenate(added))


def test_prefault_keeps_what_the_rows_hold():
    from keras_clip_it.collections import memory

    buffer = np.empty((100_000, 64), np.float32)
    buffer[:50_000] = np.arange(50_000, dtype=np.float32)[:, None]
    memory.prefault(buffer[10_000:])
    buffer[60_000:70_000] = 7.0  # written while the pages are being mapped
    memory.wait()
    np.testing.assert_array_equal(buffer[:50_000, 0], np.arange(50_000))
    assert (buffer[60_000:70_000] == 7.0).all()
    with pytest.raises(ValueError, match="contiguous"):
        memory.prefault(buffer[:, :10])


FORKED = r"""
import importlib.util, os, sys
import numpy as np
spec = importlib.util.spec_from_file_location("memory", sys.argv[1])  # numpy only: no JAX threads to fork
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)
memory.prefault(np.empty((1000, 64), np.float32))  # the parent's worker runs
memory.wait()
pid = os.fork()
if pid == 0:
    import signal
    signal.alarm(30)  # a child that hangs does not outlive the test
    buffer = np.ones((5000, 64), np.float32)
    memory.prefault(buffer)
    memory.wait()  # would never return if the child waited for the parent's worker
    os._exit(0 if buffer[:, 0].sum() == 5000 else 1)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_a_forked_child_maps_pages_with_its_own_worker():
    import subprocess
    import sys

    from keras_clip_it.collections import memory

    done = subprocess.run(
        [sys.executable, "-c", FORKED, memory.__file__], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0"
