"""Durable analogy collections at any fsspec URI: immutable segments, tombstones and numbered manifests.

A stored collection is a directory (local path, file://, memory://, s3://, gs://, or a read-only zip://):

    manifest-00000007.json                  the state: the highest generation whose self-checksum holds
    manifest-00000006.json                  the previous state, kept until the next compact()
    segments/00000005-9f1c2a7e.ids.jsonl    one JSON value per line, for each column:
    segments/00000005-9f1c2a7e.captions.jsonl   ids, captions, image_refs, metadata
    segments/00000005-9f1c2a7e.image0.npy   embeddings (rows, dims): float32, float16 or int8 ...
    segments/00000005-9f1c2a7e.image0.scales.npy  ... with per-row float32 scales for int8
    segments/00000007-0b3d51c4.removed.jsonl  a tombstone segment: ids removed from earlier segments

The manifest (JSON) holds the schema version, name, language, counts, the encoders (kind, fingerprint,
dims, storage dtype) and the ordered segment list with every file's size and sha256. Files are never
changed once written: `append` and `remove` add a segment and a manifest with the next generation number,
`compact` and `save_collection` write one fresh segment and then delete what the new manifest does not
reference. The live rows are the rows segments in order, minus the ids a later tombstone names, so an
id removed and added again lives in the newer segment.

Why numbered manifests instead of rewriting one manifest.json: a reader picks the highest generation whose
embedded checksum verifies, so a manifest cut short by a crash is skipped on every filesystem, including
those without an atomic rename. The commit point, per filesystem:
- local paths / file://: the manifest is written to a temporary file, fsynced, hard-linked to its final
  name (which fails if another writer took that generation, so concurrent writers cannot silently lose
  each other's changes) and the directory fsynced; the segments it references were fsynced before. A crash
  (even a power loss) leaves the old or the new state.
- s3, gcs, azure, memory: a single-object PUT is atomic, so the manifest appears whole or not at all; the
  segment PUTs complete before it. Concurrent writers are detected on a best-effort basis only (check, then
  put): use one writer at a time.
- other writable filesystems (sftp, hdfs, smb, ...): a torn manifest fails its checksum and the previous
  generation is opened, with a warning naming the skipped file.
- zip://, tar://, http(s)://: read-only; writing raises `ReadOnlyStorageError`.
Files left by a crashed write (segments no manifest references, temporary manifests) are ignored on open
and deleted by `compact()`. Arrays are read with `allow_pickle=False` and all other data is JSON: opening
a collection never runs code from it.

The package's modules, one concept each: `locations` (a directory on one filesystem: paths, listing,
durable writes, atomic publish), `manifests` (reading, checking and committing numbered manifests) and
`segments` (writing and loading the files of a state); the public functions are here, in front.
"""

import os

import numpy as np

from keras_clip_it.collections.columns import aligned
from keras_clip_it.collections.columns import as_ids
from keras_clip_it.collections.storage import errors
from keras_clip_it.collections.storage import locations
from keras_clip_it.collections.storage import manifests
from keras_clip_it.collections.storage import segments
from keras_clip_it.collections.storage.errors import CollectionStorageError  # noqa: F401
from keras_clip_it.collections.storage.errors import ConcurrentWriteError  # noqa: F401
from keras_clip_it.collections.storage.errors import CorruptCollectionError  # noqa: F401
from keras_clip_it.collections.storage.errors import ReadOnlyStorageError  # noqa: F401
from keras_clip_it.collections.storage.errors import UnsupportedSchemaError  # noqa: F401


def open_collection(uri, verify=True, generation=None):
    """Opens the analogy collection stored at an fsspec URI or local path.

    Every file is checked against the manifest before anything is returned: sizes, array shapes and
    dtypes always, sha256 checksums too unless `verify=False` (hashing reads every byte once, about a
    second per GB; skip it for huge collections opened often from trusted local disks). On a local
    filesystem a float32 collection in one segment is memory-mapped copy-on-write, so opening costs no
    RAM and changes made in memory never reach the files; otherwise live rows are read into memory.

    Args:
        uri: str or os.PathLike, e.g. "/data/films-it", "memory://films-it", "s3://bucket/films-it",
            "zip://::/data/films-it.zip".
        verify: bool, whether to check sha256 checksums (sizes and shapes are checked regardless).
        generation: optional int, open this older state (one listed by `info(uri)["generations"]`)
            instead of the newest, e.g. when the newest references a damaged file.

    Returns:
        An `AnalogyCollection`.

    Example:
    >>> col = open_collection("memory://demo")  # doctest: +SKIP
    >>> col.embeddings("text", text_encoder.fingerprint).shape  # doctest: +SKIP
    (1900, 384)
    """
    location = locations.Location(uri)
    manifest, stored = segments.open_stored(location, verify, generation, embeddings=True)
    collection = _opened_as(name=manifest["name"], language=manifest["language"])
    collection.add(stored.ids, captions=stored.captions, image_refs=stored.image_refs, metadata=stored.metadata)
    for encoder in manifest["encoders"]:
        key = (encoder["kind"], encoder["fingerprint"])
        collection.set_embeddings(*key, stored.float32_embeddings(key))
    return collection


def save_collection(collection, uri, dtype="float32"):
    """Writes a whole collection to `uri` as one segment, replacing any collection stored there.

    The new state becomes visible at once when its manifest is committed; the files of the previous state
    are deleted only afterwards, so a crash at any point leaves the old or the new collection. A directory
    that holds other files but no collection is refused rather than mixed with.

    Args:
        collection: an `AnalogyCollection` (or any object with its ids, captions, image_refs, metadata,
            fingerprints, embeddings(kind, fingerprint), name and language).
        uri: str or os.PathLike, where to write.
        dtype: "float32", "float16" or "int8" (per-row float32 scales): how embeddings are stored. int8
            takes a quarter of the space; scores change by about 1% of a row's largest value.

    Returns:
        The new generation number (int).

    Example:
    >>> save_collection(col, "memory://demo", dtype="float16")  # doctest: +SKIP
    1
    """
    _check_dtype(dtype)
    location = locations.Location(uri)
    location.check_writable()
    existing = manifests.manifest_names(location)
    if not existing:
        location.check_no_foreign_files()
    last = max(existing, default=0)
    segment_name = manifests.segment_name(last + 1)
    columns = {
        "ids": [str(i) for i in collection.ids],
        "captions": collection.captions,
        "image_refs": [_image_ref(ref) for ref in collection.image_refs],
        "metadata": collection.metadata,
    }
    encoders, arrays = [], []
    for kind in manifests.KINDS:
        for fingerprint in collection.fingerprints[kind]:
            array = np.asarray(collection.embeddings(kind, fingerprint), dtype=np.float32)
            encoders.append(_encoder_entry(kind, fingerprint, array.shape[1], dtype))
            arrays.append(segments.encode(array, dtype))
    segment = segments.write_rows_segment(location, segment_name, columns, encoders, arrays)
    manifest = manifests.new_manifest(last + 1, collection.name, collection.language, encoders, [segment])
    manifests.commit(location, manifest, keep=None)
    return manifest["generation"]


def append(uri, ids, captions=None, image_refs=None, metadata=None, embeddings=None):
    """Adds pairs to a stored collection by writing one new segment, without rewriting the others.

    The new pairs need embeddings for every encoder the collection holds (a collection never has rows
    one of its encoders has not embedded); an empty collection takes any encoders. Ids already in the
    collection are refused.

    Args:
        uri: str or os.PathLike of an existing collection.
        ids: list of str, unique and not already stored.
        captions, image_refs, metadata: lists aligned with `ids` (or None).
        embeddings: {"image"|"text": {fingerprint: (n, dims) array}}.

    Returns:
        The new generation number (int).

    Example:
    >>> append("memory://demo", ["x1"], captions=["un gatto"],
    ...        embeddings={"text": {fp: vectors}})  # doctest: +SKIP
    2
    """
    location = locations.Location(uri)
    location.check_writable()
    manifest, stored = segments.open_stored(location, verify=True, generation=None, embeddings=False)
    ids = as_ids(ids)
    n = len(ids)
    live = set(stored.ids)
    repeated = sorted({i for i in ids if i in live} | segments.repeated(ids))
    if repeated:
        raise ValueError(f"ids already in the collection at {location.uri!r} or repeated: {errors.preview(repeated)}")
    columns = {
        "ids": ids,
        "captions": aligned(captions, n, "captions"),
        "image_refs": [_image_ref(ref) for ref in aligned(image_refs, n, "image_refs")],
        "metadata": [dict(m) if m is not None else {} for m in aligned(metadata, n, "metadata")],
    }
    given = _embeddings_by_key(embeddings, n)
    if manifest["counts"]["pairs"] == 0:
        # Nothing alive: the history (all removed) is dropped and the given encoders define the collection.
        dtypes = {(e["kind"], e["fingerprint"]): e["dtype"] for e in manifest["encoders"]}
        encoders = [
            _encoder_entry(kind, fingerprint, array.shape[1], dtypes.get((kind, fingerprint), "float32"))
            for (kind, fingerprint), array in given.items()
        ]
        previous = []
    else:
        encoders = manifest["encoders"]
        expected = [(e["kind"], e["fingerprint"]) for e in encoders]
        if sorted(given) != sorted(expected):
            raise ValueError(
                f"the collection at {location.uri!r} holds embeddings for {errors.encoder_keys(expected)}, "
                f"got {errors.encoder_keys(given)}: "
                "pass exactly those for the new pairs (embeddings={kind: {fingerprint: array}})"
            )
        for encoder in encoders:
            dims = given[(encoder["kind"], encoder["fingerprint"])].shape[1]
            if dims != encoder["dims"]:
                raise ValueError(
                    f"{encoder['kind']} embeddings {encoder['fingerprint'][:12]} of the collection at "
                    f"{location.uri!r} have {encoder['dims']} dims, got {dims}: use the same encoder"
                )
        previous = manifest["segments"]
    arrays = [segments.encode(given[(e["kind"], e["fingerprint"])], e["dtype"]) for e in encoders]
    last = stored.last_generation
    segment = segments.write_rows_segment(location, manifests.segment_name(last + 1), columns, encoders, arrays)
    new = manifests.new_manifest(last + 1, manifest["name"], manifest["language"], encoders, previous + [segment])
    manifests.commit(location, new, keep=manifest["generation"])
    return new["generation"]


def remove(uri, ids):
    """Removes pairs from a stored collection by writing a tombstone segment that names their ids.

    Args:
        uri: str or os.PathLike of an existing collection.
        ids: list of str ids in the collection (unknown ids raise KeyError naming them, and nothing changes).

    Returns:
        The new generation number (int), or the current one if `ids` is empty.

    Example:
    >>> remove("memory://demo", ["x1"])  # doctest: +SKIP
    3
    """
    location = locations.Location(uri)
    location.check_writable()
    manifest, stored = segments.open_stored(location, verify=True, generation=None, embeddings=False)
    ids = list(dict.fromkeys(as_ids(ids)))
    if not ids:
        return manifest["generation"]
    live = set(stored.ids)
    missing = [i for i in ids if i not in live]
    if missing:
        raise KeyError(f"the collection at {location.uri!r} has no pairs with ids {errors.preview(missing)}")
    last = stored.last_generation
    name = manifests.segment_name(last + 1)
    entry = location.write_file(f"{locations.SEGMENTS}/{name}.removed.jsonl", [segments.jsonl(ids, "ids")])
    segment = {"type": "tombstones", "name": name, "rows": len(ids), "files": {"ids": entry}}
    new = manifests.new_manifest(
        last + 1, manifest["name"], manifest["language"], manifest["encoders"], manifest["segments"] + [segment]
    )
    manifests.commit(location, new, keep=manifest["generation"])
    return new["generation"]


def compact(uri, dtype=None):
    """Rewrites a stored collection as one segment without tombstones, and deletes every unused file.

    Use it after many appends and removals (fewer files, no removed rows on disk, and a single float32
    segment is memory-mapped on open) and after a crash (it deletes the files the crash left). The live
    rows keep their order. Checksums are verified first: a damaged collection is refused, nothing deleted.

    Args:
        uri: str or os.PathLike of an existing collection.
        dtype: optional new storage dtype ("float32", "float16", "int8"); by default each encoder keeps its
            own and its stored values are copied bit for bit.

    Returns:
        The new generation number (int).

    Example:
    >>> compact("/data/films-it")  # doctest: +SKIP
    9
    """
    if dtype is not None:
        _check_dtype(dtype)
    location = locations.Location(uri)
    location.check_writable()
    manifest, stored = segments.open_stored(location, verify=True, generation=None, embeddings=True)
    encoders, arrays = [], []
    for encoder in manifest["encoders"]:
        key = (encoder["kind"], encoder["fingerprint"])
        if dtype is None or dtype == encoder["dtype"]:
            encoders.append(encoder)
            arrays.append(stored.raw_embeddings(key))
        else:
            encoders.append(dict(encoder, dtype=dtype))
            arrays.append(segments.encode(stored.float32_embeddings(key), dtype))
    last = stored.last_generation
    columns = {name: getattr(stored, name) for name in manifests.COLUMNS}
    segment = segments.write_rows_segment(location, manifests.segment_name(last + 1), columns, encoders, arrays)
    new = manifests.new_manifest(last + 1, manifest["name"], manifest["language"], encoders, [segment])
    manifests.commit(location, new, keep=None)
    return new["generation"]


def info(uri):
    """What a stored collection holds, from its manifest alone (no segment is read).

    Args:
        uri: str or os.PathLike of an existing collection.

    Returns:
        A dict with name, language, schema_version, generation, generations (the states that can be
        opened), counts (pairs, stored_rows, removed, segments, bytes) and encoders (kind, fingerprint,
        dims, dtype).

    Example:
    >>> info("memory://demo")["counts"]["pairs"]  # doctest: +SKIP
    1900
    """
    location = locations.Location(uri)
    manifest, _ = manifests.read_manifest(location, None)
    return {
        "uri": location.uri,
        "name": manifest["name"],
        "language": manifest["language"],
        "schema_version": manifest["schema_version"],
        "generation": manifest["generation"],
        "generations": sorted(manifests.manifest_names(location)),
        "counts": dict(manifest["counts"]),
        "encoders": [dict(e) for e in manifest["encoders"]],
    }


def opens_as(collection_class):
    """Sets the class `open_collection` returns; `AnalogyCollection` calls it once, when it is defined.

    Storage sits below the in-memory collection: `AnalogyCollection.save` calls `save_collection`, so
    storage cannot import `analogy_collection` back. The class is handed down instead. Importing any
    `keras_clip_it.collections.*` module first runs `keras_clip_it/collections/__init__.py`, which imports
    `analogy_collection`, so the class is always set before `open_collection` can be called.

    Args:
        collection_class: a class taking `name` and `language` with `add` and `set_embeddings` methods.
    """
    global _opened_as
    _opened_as = collection_class


_opened_as = None


# === Input checks ===


def _check_dtype(dtype):
    if dtype not in manifests.DTYPES:
        raise ValueError(f"dtype must be one of {manifests.DTYPES}, got {dtype!r}")


def _encoder_entry(kind, fingerprint, dims, dtype):
    return {"kind": kind, "fingerprint": str(fingerprint), "dims": int(dims), "dtype": dtype}


def _embeddings_by_key(embeddings, n):
    out = {}
    for kind, by_fingerprint in (embeddings or {}).items():
        if kind not in manifests.KINDS:
            raise ValueError(f"embeddings kinds must be 'image' or 'text', got {kind!r}")
        for fingerprint, array in by_fingerprint.items():
            array = np.asarray(array, dtype=np.float32)
            if array.ndim != 2 or array.shape[0] != n:
                raise ValueError(
                    f"{kind} embeddings {str(fingerprint)[:12]} must have shape ({n}, dims) for {n} ids, "
                    f"got {array.shape}"
                )
            if not np.isfinite(array).all():
                raise ValueError(f"{kind} embeddings {str(fingerprint)[:12]} contain NaN or infinite values")
            out[(kind, str(fingerprint))] = array
    return out


def _image_ref(ref):
    if ref is None or isinstance(ref, str):
        return ref
    if isinstance(ref, os.PathLike):
        return os.fspath(ref)
    raise TypeError(
        f"image_refs must be paths or URIs (str) or None, got {type(ref).__name__}: write pixel arrays to "
        "files first (a collection stores references, not pixels)"
    )
