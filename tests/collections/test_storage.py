import hashlib
import json
import mmap
import os
import uuid
import warnings
import zipfile

import fsspec
import numpy as np
import pytest

from keras_clip_it.collections import AnalogyCollection
from keras_clip_it.collections import storage
from keras_clip_it.collections.storage import manifests
from keras_clip_it.collections.storage import segments

IMAGE, TEXT = "img-fingerprint-0001", "txt-fingerprint-0002"


def _pairs(n, start=0, seed=0, image_dims=6, text_dims=5):
    rng = np.random.default_rng(seed * 1000 + start)
    ids = [f"p{i}" for i in range(start, start + n)]
    captions = [f"un gatto numero {i} è qui" if i % 7 else None for i in range(start, start + n)]
    image_refs = [f"images/{i}.png" if i % 3 else None for i in range(start, start + n)]
    metadata = [{"i": i, "tags": ["a", "ß"], "nested": {"x": i / 3}} for i in range(start, start + n)]
    embeddings = {
        "image": {IMAGE: rng.standard_normal((n, image_dims)).astype("float32")},
        "text": {TEXT: rng.standard_normal((n, text_dims)).astype("float32")},
    }
    return dict(ids=ids, captions=captions, image_refs=image_refs, metadata=metadata, embeddings=embeddings)


def _collection(n=40, **kwargs):
    col = AnalogyCollection(name="test-it", language="it")
    col.add(**_pairs(n, **kwargs))
    return col


def _state(col):
    """id -> (caption, image_ref, metadata, image row, text row): the content independent of row order."""
    image, text = col.embeddings("image", IMAGE), col.embeddings("text", TEXT)
    return {
        i: (c, r, json.dumps(m, sort_keys=True), image[row].tobytes(), text[row].tobytes())
        for row, (i, c, r, m) in enumerate(zip(col.ids, col.captions, col.image_refs, col.metadata))
    }


def _files(root):
    """{relative path: sha256} of every file under a local directory: proves nothing was changed."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _is_memory_mapped(array):
    while array is not None:
        if isinstance(array, (np.memmap, mmap.mmap)):
            return True
        array = getattr(array, "base", None)
    return False


def _manifest_path(root):
    names = sorted(n for n in os.listdir(root) if n.startswith("manifest-"))
    return os.path.join(root, names[-1])


def _rewrite_manifest(root, change):
    """Edits the newest manifest and re-signs it, as a buggy writer or a hand edit would."""
    path = _manifest_path(root)
    with open(path) as f:
        manifest = json.load(f)
    change(manifest)
    manifest["checksum"] = manifests.checksum(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


@pytest.fixture(params=["file", "memory"])
def uri(request, tmp_path):
    if request.param == "file":
        yield str(tmp_path / "col")
        return
    path = f"memory://kci-storage-test-{uuid.uuid4().hex}"
    yield path
    fs = fsspec.filesystem("memory")
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.mark.parametrize("dtype, tolerance", [("float32", 0.0), ("float16", 2e-3), ("int8", 2e-2)])
def test_round_trip(uri, dtype, tolerance):
    col = _collection()
    assert storage.save_collection(col, uri, dtype=dtype) == 1
    back = storage.open_collection(uri)
    assert isinstance(back, AnalogyCollection)
    assert (back.name, back.language, back.ids) == ("test-it", "it", col.ids)
    assert back.captions == col.captions and back.image_refs == col.image_refs and back.metadata == col.metadata
    assert back.fingerprints == col.fingerprints
    for kind, fingerprint in (("image", IMAGE), ("text", TEXT)):
        stored, original = back.embeddings(kind, fingerprint), col.embeddings(kind, fingerprint)
        assert stored.dtype == np.float32 and stored.shape == original.shape
        scale = np.abs(original).max(axis=1, keepdims=True)
        assert np.all(np.abs(stored - original) <= tolerance * scale)
    info = storage.info(uri)
    assert info["counts"]["pairs"] == 40 and info["generations"] == [1]
    assert {(e["kind"], e["dims"], e["dtype"]) for e in info["encoders"]} == {("image", 6, dtype), ("text", 5, dtype)}


def test_local_float32_is_memory_mapped_and_changes_in_memory_do_not_reach_the_files(tmp_path):
    root = str(tmp_path / "col")
    col = _collection()
    storage.save_collection(col, root)
    before = _files(root)
    back = storage.open_collection(root)
    assert _is_memory_mapped(back.embeddings("image", IMAGE))
    back.remove(["p1", "p2"])  # moves rows inside the mapped arrays
    back.add(**_pairs(3, start=100))
    assert len(back) == 41
    assert _files(root) == before
    assert _state(storage.open_collection(root)) == _state(col)


def test_empty_collection_round_trips(uri):
    storage.save_collection(AnalogyCollection(name="empty", language="en"), uri)
    back = storage.open_collection(uri)
    assert len(back) == 0 and back.name == "empty"
    storage.append(uri, **_pairs(3))
    assert _state(storage.open_collection(uri)) == _state(_collection(3))


def test_append_remove_compact_match_the_in_memory_collection(uri):
    reference = _collection(30)
    storage.save_collection(reference, uri, dtype="float32")
    for step in range(3):
        batch = _pairs(10, start=100 + 10 * step)
        storage.append(uri, **batch)
        reference.add(**batch)
        gone = reference.ids[step :: 4]
        storage.remove(uri, gone)
        reference.remove(gone)
    # An id removed earlier comes back in a newer segment.
    again = _pairs(1, start=0, seed=5)
    storage.append(uri, **again)
    reference.add(**again)
    assert _state(storage.open_collection(uri)) == _state(reference)
    counts = storage.info(uri)["counts"]
    assert counts["pairs"] == len(reference) and counts["segments"] == 8 and counts["removed"] > 0
    assert storage.compact(uri) == 9
    info = storage.info(uri)
    assert info["counts"]["segments"] == 1 and info["counts"]["removed"] == 0 and info["generations"] == [9]
    assert _state(storage.open_collection(uri)) == _state(reference)


def test_compact_int8_copies_stored_values_and_can_change_dtype(tmp_path):
    root = str(tmp_path / "col")
    storage.save_collection(_collection(20), root, dtype="int8")
    storage.remove(root, ["p3"])
    before = storage.open_collection(root).embeddings("text", TEXT).copy()
    storage.compact(root)
    np.testing.assert_array_equal(storage.open_collection(root).embeddings("text", TEXT), before)
    storage.compact(root, dtype="float32")
    compacted = storage.open_collection(root)
    np.testing.assert_array_equal(compacted.embeddings("text", TEXT), before)
    assert _is_memory_mapped(compacted.embeddings("text", TEXT))


def test_save_replaces_an_existing_collection_and_deletes_its_files(tmp_path):
    root = str(tmp_path / "col")
    storage.save_collection(_collection(10), root)
    storage.append(root, **_pairs(5, start=50))
    storage.save_collection(_collection(4, seed=3), root)
    assert _state(storage.open_collection(root)) == _state(_collection(4, seed=3))
    manifest = json.load(open(_manifest_path(root)))
    referenced = {e["path"] for s in manifest["segments"] for e in manifests.segment_files(s)}
    on_disk = {f"segments/{name}" for name in os.listdir(os.path.join(root, "segments"))}
    assert on_disk == referenced and len(os.listdir(root)) == 2


def test_the_in_memory_collection_saves_and_loads_through_the_package(tmp_path):
    import keras_clip_it as kci

    root = str(tmp_path / "films")
    col = _collection(12)
    assert col.save(root, dtype="float16") == 1
    back = kci.collections.load(root)
    assert back.ids == col.ids and back.captions == col.captions
    np.testing.assert_allclose(back.embeddings("text", TEXT), col.embeddings("text", TEXT), atol=2e-3)


def test_zip_archive_opens_read_only(tmp_path):
    root = tmp_path / "col"
    col = _collection(15)
    storage.save_collection(col, str(root))
    storage.append(str(root), **_pairs(5, start=70))
    storage.remove(str(root), ["p2"])
    expected = _state(storage.open_collection(str(root)))
    archive = tmp_path / "col.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in root.rglob("*"):
            z.write(path, path.relative_to(root).as_posix())
    uri = f"zip://::{archive}"
    assert _state(storage.open_collection(uri)) == expected
    for change in (
        lambda: storage.append(uri, **_pairs(1, start=900)),
        lambda: storage.remove(uri, ["p3"]),
        lambda: storage.compact(uri),
        lambda: storage.save_collection(col, uri),
    ):
        with pytest.raises(storage.ReadOnlyStorageError, match="read-only"):
            change()


def test_bad_appends_and_removals_change_nothing(tmp_path):
    root = str(tmp_path / "col")
    storage.save_collection(_collection(10), root)
    before = _files(root)
    batch = _pairs(3, start=8)  # p8 and p9 are already stored
    with pytest.raises(ValueError, match="'p8', 'p9'"):
        storage.append(root, **batch)
    repeated = _pairs(2, start=20)
    repeated["ids"] = ["q", "q"]
    with pytest.raises(ValueError, match="'q'"):
        storage.append(root, **repeated)
    wide = _pairs(2, start=20, image_dims=7)
    with pytest.raises(ValueError, match="6 dims, got 7"):
        storage.append(root, **wide)
    partial = _pairs(2, start=20)
    del partial["embeddings"]["text"]
    with pytest.raises(ValueError, match="pass exactly those"):
        storage.append(root, **partial)
    unserialisable = _pairs(2, start=20)
    unserialisable["metadata"][1] = {"array": np.zeros(2)}
    with pytest.raises(TypeError, match="metadata of pair 'p21'"):
        storage.append(root, **unserialisable)
    with pytest.raises(KeyError, match="'nope'"):
        storage.remove(root, ["p1", "nope"])
    assert _files(root) == before


def test_saving_into_a_directory_of_other_files_is_refused(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"not a collection")
    with pytest.raises(storage.CollectionStorageError, match="holiday.jpg"):
        storage.save_collection(_collection(3), str(tmp_path))
    assert os.listdir(tmp_path) == ["holiday.jpg"]


def test_missing_collection_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no analogy collection"):
        storage.open_collection(str(tmp_path / "nothing"))


def _segment_file(root, suffix):
    manifest = json.load(open(_manifest_path(root)))
    for segment in reversed(manifest["segments"]):  # the newest first
        for entry in manifests.segment_files(segment):
            if entry["path"].endswith(suffix):
                return os.path.join(root, entry["path"])
    raise AssertionError(suffix)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_last_byte(path):
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0x55]))


@pytest.mark.parametrize(
    "damage, suffix, message",
    [
        (_truncate, ".image0.npy", "bytes, the manifest says"),
        (_truncate, ".captions.jsonl", "bytes, the manifest says"),
        (_truncate, ".removed.jsonl", "bytes, the manifest says"),
        (_flip_last_byte, ".text1.npy", "sha256"),
        (_flip_last_byte, ".metadata.jsonl", "sha256"),
        (os.unlink, ".ids.jsonl", "is missing"),
    ],
)
def test_damaged_segments_are_named_and_nothing_is_lost(tmp_path, damage, suffix, message):
    root = str(tmp_path / "col")
    storage.save_collection(_collection(10), root)
    storage.remove(root, ["p4"])
    path = _segment_file(root, suffix)
    damage(path)
    before = _files(root)
    with pytest.raises(storage.CorruptCollectionError, match=message) as error:
        storage.open_collection(root)
    assert os.path.basename(path) in str(error.value) and "Nothing was changed" in str(error.value)
    with pytest.raises(storage.CorruptCollectionError, match=os.path.basename(path)):
        storage.compact(root)
    assert _files(root) == before


def test_an_older_generation_opens_when_the_newest_segment_is_damaged(tmp_path):
    root = str(tmp_path / "col")
    storage.save_collection(_collection(10), root)
    storage.append(root, **_pairs(4, start=40))
    _truncate(_segment_file(root, ".image0.npy"))
    with pytest.raises(storage.CorruptCollectionError):
        storage.open_collection(root)
    assert storage.info(root)["generations"] == [1, 2]
    assert _state(storage.open_collection(root, generation=1)) == _state(_collection(10))


def test_without_verification_sizes_and_shapes_are_still_checked(tmp_path):
    root = str(tmp_path / "col")
    storage.save_collection(_collection(10), root)
    path = _segment_file(root, ".image0.npy")
    _flip_last_byte(path)
    assert len(storage.open_collection(root, verify=False)) == 10  # a flipped bit only a checksum can see
    _truncate(path)
    with pytest.raises(storage.CorruptCollectionError, match="bytes, the manifest says"):
        storage.open_collection(root, verify=False)


def test_wrong_dimensions_in_a_segment(tmp_path):
    root = str(tmp_path / "col")
    storage.save_collection(_collection(10), root)
    path = _segment_file(root, ".image0.npy")
    # Same byte count, other shape: (10, 6) float32 stored as (20, 3).
    np.save(path, np.zeros((20, 3), np.float32))
    with open(path, "rb") as f:
        data = f.read()

    def resign(manifest):
        for entry in manifests.segment_files(manifest["segments"][0]):
            if entry["path"].endswith(".image0.npy"):
                entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    _rewrite_manifest(root, resign)
    with pytest.raises(storage.CorruptCollectionError, match=r"float32 \(20, 3\), the manifest says float32 \(10, 6\)"):
        storage.open_collection(root)


def test_duplicate_ids_across_segments(tmp_path):
    root = str(tmp_path / "col")
    storage.save_collection(_collection(5), root)
    _rewrite_manifest(root, lambda m: m["segments"].append(m["segments"][0]))
    with pytest.raises(storage.CorruptCollectionError, match="repeats ids that are already alive: 'p0'"):
        storage.open_collection(root)


@pytest.mark.parametrize("version, advice", [(99, "upgrade keras-clip-it"), (0, "version that wrote it")])
def test_unknown_schema_version(tmp_path, version, advice):
    root = str(tmp_path / "col")
    storage.save_collection(_collection(5), root)
    _rewrite_manifest(root, lambda m: m.update(schema_version=version))
    before = _files(root)
    with pytest.raises(storage.UnsupportedSchemaError, match=f"schema version {version}.*{advice}"):
        storage.open_collection(root)
    with pytest.raises(storage.UnsupportedSchemaError):
        storage.compact(root)
    assert _files(root) == before


def test_a_torn_newest_manifest_falls_back_to_the_previous_state(uri):
    col = _collection(8)
    storage.save_collection(col, uri)
    storage.remove(uri, ["p0"])
    expected = _state(storage.open_collection(uri))
    fs, root = fsspec.core.url_to_fs(uri)
    newest = f"{root}/manifest-00000002.json"
    data = fs.cat_file(newest)
    # What a crash halfway through a non-atomic write of generation 3 leaves behind.
    fs.pipe_file(f"{root}/manifest-00000003.json", data[: len(data) // 2])
    with pytest.warns(UserWarning, match="manifest-00000003.json"):
        assert _state(storage.open_collection(uri)) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage.append(uri, **_pairs(2, start=60))
    assert storage.info(uri)["generations"] == [2, 4]
    assert len(storage.open_collection(uri)) == 9


def test_orphan_files_of_a_crashed_write_are_ignored_then_collected(tmp_path):
    root = str(tmp_path / "col")
    col = _collection(6)
    storage.save_collection(col, root)
    with open(os.path.join(root, "segments", "00000002-deadbeef.image0.npy"), "wb") as f:
        f.write(b"half an array")
    with open(os.path.join(root, ".manifest-00000002.json.0123abcd.tmp"), "wb") as f:
        f.write(b'{"cut sh')
    assert _state(storage.open_collection(root)) == _state(col)
    storage.compact(root)
    assert not any("deadbeef" in name for name in os.listdir(os.path.join(root, "segments")))
    assert sorted(os.listdir(root)) == ["manifest-00000002.json", "segments"]
    assert _state(storage.open_collection(root)) == _state(col)


def test_a_concurrent_writer_is_detected_and_its_change_kept(tmp_path, monkeypatch):
    root = str(tmp_path / "col")
    storage.save_collection(_collection(6), root)
    write_segment = segments.write_rows_segment
    interfered = []

    def racing(*args):
        segment = write_segment(*args)
        if not interfered:
            interfered.append(True)
            storage.remove(root, ["p0"])  # another writer commits generation 2 meanwhile
        return segment

    monkeypatch.setattr(segments, "write_rows_segment", racing)
    with pytest.raises(storage.ConcurrentWriteError, match="retry"):
        storage.append(root, **_pairs(2, start=50))
    monkeypatch.undo()
    back = storage.open_collection(root)
    assert "p0" not in back.ids and len(back) == 5
