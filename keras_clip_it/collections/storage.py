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
"""

import hashlib
import io
import json
import os
import posixpath
import re
import secrets
import warnings

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

SCHEMA_VERSION = 1
FORMAT = "keras-clip-it analogy collection"
DTYPES = ("float32", "float16", "int8")
KINDS = ("image", "text")
COLUMNS = ("ids", "captions", "image_refs", "metadata")
SEGMENTS = "segments"
READ_ONLY_PROTOCOLS = frozenset({"zip", "tar", "http", "https", "github", "libarchive", "reference"})
_MANIFEST_NAME = re.compile(r"^manifest-(\d{8})\.json$")
_SEGMENT_PATH = re.compile(r"^segments/[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
_HASH_CHUNK = 16 << 20


class CollectionStorageError(ValueError):
    """A stored collection cannot be read or written as asked; the message says which file and what to do."""


class CorruptCollectionError(CollectionStorageError):
    """A file of a stored collection is missing, truncated, or does not match its manifest."""


class UnsupportedSchemaError(CollectionStorageError):
    """The collection was written with a storage schema this version of keras-clip-it cannot read."""


class ReadOnlyStorageError(CollectionStorageError):
    """The URI points into a read-only filesystem (a zip or tar archive, http)."""


class ConcurrentWriteError(CollectionStorageError):
    """Another writer committed the same generation first; this call changed nothing."""


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
    # Imported here so that this module loads with numpy and fsspec alone (the crash tests start many
    # bare processes that must not pay for importing keras).
    from keras_clip_it.collections.analogy_collection import AnalogyCollection

    location = _Location(uri)
    manifest, stored = _open_stored(location, verify, generation, embeddings=True)
    collection = AnalogyCollection(name=manifest["name"], language=manifest["language"])
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
    location = _Location(uri)
    location.check_writable()
    existing = _manifest_names(location)
    if not existing:
        location.check_no_foreign_files()
    last = max(existing, default=0)
    segment_name = _segment_name(last + 1)
    columns = {
        "ids": [str(i) for i in collection.ids],
        "captions": collection.captions,
        "image_refs": [_image_ref(ref) for ref in collection.image_refs],
        "metadata": collection.metadata,
    }
    encoders, arrays = [], []
    for kind in KINDS:
        for fingerprint in collection.fingerprints[kind]:
            array = np.asarray(collection.embeddings(kind, fingerprint), dtype=np.float32)
            encoders.append(_encoder_entry(kind, fingerprint, array.shape[1], dtype))
            arrays.append(_encode(array, dtype))
    segment = _write_rows_segment(location, segment_name, columns, encoders, arrays)
    manifest = _new_manifest(last + 1, collection.name, collection.language, encoders, [segment])
    _commit(location, manifest, keep=None)
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
    location = _Location(uri)
    location.check_writable()
    manifest, stored = _open_stored(location, verify=True, generation=None, embeddings=False)
    ids = _as_ids(ids)
    n = len(ids)
    live = set(stored.ids)
    repeated = sorted({i for i in ids if i in live} | _repeated(ids))
    if repeated:
        raise ValueError(f"ids already in the collection at {location.uri!r} or repeated: {_preview(repeated)}")
    columns = {
        "ids": ids,
        "captions": _aligned(captions, n, "captions"),
        "image_refs": [_image_ref(ref) for ref in _aligned(image_refs, n, "image_refs")],
        "metadata": [dict(m) if m is not None else {} for m in _aligned(metadata, n, "metadata")],
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
                f"the collection at {location.uri!r} holds embeddings for {_keys(expected)}, got {_keys(given)}: "
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
    arrays = [_encode(given[(e["kind"], e["fingerprint"])], e["dtype"]) for e in encoders]
    last = stored.last_generation
    segment = _write_rows_segment(location, _segment_name(last + 1), columns, encoders, arrays)
    new = _new_manifest(last + 1, manifest["name"], manifest["language"], encoders, previous + [segment])
    _commit(location, new, keep=manifest["generation"])
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
    location = _Location(uri)
    location.check_writable()
    manifest, stored = _open_stored(location, verify=True, generation=None, embeddings=False)
    ids = list(dict.fromkeys(_as_ids(ids)))
    if not ids:
        return manifest["generation"]
    live = set(stored.ids)
    missing = [i for i in ids if i not in live]
    if missing:
        raise KeyError(f"the collection at {location.uri!r} has no pairs with ids {_preview(missing)}")
    last = stored.last_generation
    name = _segment_name(last + 1)
    entry = location.write_file(f"{SEGMENTS}/{name}.removed.jsonl", [_jsonl(ids, "ids")])
    segment = {"type": "tombstones", "name": name, "rows": len(ids), "files": {"ids": entry}}
    new = _new_manifest(
        last + 1, manifest["name"], manifest["language"], manifest["encoders"], manifest["segments"] + [segment]
    )
    _commit(location, new, keep=manifest["generation"])
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
    location = _Location(uri)
    location.check_writable()
    manifest, stored = _open_stored(location, verify=True, generation=None, embeddings=True)
    encoders, arrays = [], []
    for encoder in manifest["encoders"]:
        key = (encoder["kind"], encoder["fingerprint"])
        if dtype is None or dtype == encoder["dtype"]:
            encoders.append(encoder)
            arrays.append(stored.raw_embeddings(key))
        else:
            encoders.append(dict(encoder, dtype=dtype))
            arrays.append(_encode(stored.float32_embeddings(key), dtype))
    last = stored.last_generation
    columns = {name: getattr(stored, name) for name in COLUMNS}
    segment = _write_rows_segment(location, _segment_name(last + 1), columns, encoders, arrays)
    new = _new_manifest(last + 1, manifest["name"], manifest["language"], encoders, [segment])
    _commit(location, new, keep=None)
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
    location = _Location(uri)
    manifest, _ = _read_manifest(location, None)
    return {
        "uri": location.uri,
        "name": manifest["name"],
        "language": manifest["language"],
        "schema_version": manifest["schema_version"],
        "generation": manifest["generation"],
        "generations": sorted(_manifest_names(location)),
        "counts": dict(manifest["counts"]),
        "encoders": [dict(e) for e in manifest["encoders"]],
    }


# === Locations ===


class _Location:
    """A collection directory on one fsspec filesystem, with the few operations storage needs."""

    def __init__(self, uri):
        if isinstance(uri, os.PathLike):
            uri = os.fspath(uri)
        if not isinstance(uri, str) or not uri:
            raise TypeError(f"a collection location is a path or fsspec URI string, got {uri!r}")
        self.uri = uri
        self.fs, root = fsspec.core.url_to_fs(uri)
        self.root = root.rstrip("/") if root not in ("", "/") else root
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.read_only = bool(protocols & READ_ONLY_PROTOCOLS)
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, relative):
        return posixpath.join(self.root, relative) if self.root else relative

    def check_writable(self):
        if self.read_only:
            raise ReadOnlyStorageError(
                f"{self.uri!r} is read-only ({type(self.fs).__name__}): open it with open_collection, then "
                "save it to a writable location (col.save('/some/dir')) and change it there"
            )

    def listdir(self, relative=""):
        """Base names in a directory; an empty list when it does not exist."""
        path = self.path(relative) if relative else self.root
        if self.local:
            return os.listdir(path) if os.path.isdir(path) else []
        self.fs.invalidate_cache(path)  # listings are cached per filesystem instance; others may have written
        try:
            entries = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [posixpath.basename(entry.rstrip("/")) for entry in entries]

    def check_no_foreign_files(self):
        foreign = [n for n in self.listdir() if n != SEGMENTS and not _is_temporary_manifest(n)]
        if foreign:
            raise CollectionStorageError(
                f"{self.uri!r} holds files that are not an analogy collection ({_preview(sorted(foreign))}): "
                "save to a new or empty directory"
            )

    def size(self, relative):
        path = self.path(relative)
        if self.local:
            return os.stat(path).st_size
        return self.fs.size(path)

    def read(self, relative):
        path = self.path(relative)
        if self.local:
            with open(path, "rb") as f:
                return f.read()
        return self.fs.cat_file(path)

    def sha256(self, relative):
        digest = hashlib.sha256()
        with self.fs.open(self.path(relative), "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def write_file(self, relative, chunks):
        """Writes a new file from byte chunks (durably when local); returns its manifest entry."""
        path = self.path(relative)
        digest, size = hashlib.sha256(), 0
        if self.local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            with open(path, "xb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
        else:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with self.fs.open(path, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        return {"path": relative, "bytes": size, "sha256": digest.hexdigest()}

    def publish(self, name, data):
        """Makes a manifest visible under `name` in one step, refusing to replace an existing one."""
        path = self.path(name)
        if not self.local:
            if self.fs.exists(path):
                raise _Taken(name)
            self.fs.pipe_file(path, data)
            return
        _fsync_directory(self.path(SEGMENTS))
        temporary = self.path(f".{name}.{secrets.token_hex(4)}.tmp")
        with open(temporary, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            os.unlink(temporary)
            raise _Taken(name) from None
        except OSError:
            # Filesystems without hard links (FAT, some network mounts): an atomic rename, racing writers
            # are then only caught by this check.
            if os.path.exists(path):
                os.unlink(temporary)
                raise _Taken(name) from None
            os.replace(temporary, path)
        else:
            os.unlink(temporary)
        _fsync_directory(self.root)

    def delete(self, relative):
        path = self.path(relative)
        try:
            if self.local:
                os.unlink(path)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass


class _Taken(Exception):
    """The manifest generation a writer wanted was committed by someone else first."""


def _fsync_directory(path):
    """Makes renames and new files in a directory durable (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _is_temporary_manifest(name):
    return name.startswith(".manifest-") and name.endswith(".tmp")


# === Manifests ===


def _manifest_names(location):
    """{generation: file name} of every manifest file present, valid or not."""
    found = {}
    for name in location.listdir():
        match = _MANIFEST_NAME.match(name)
        if match:
            found[int(match.group(1))] = name
    return found


def _checksum(manifest):
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_manifest(location, generation):
    """The newest valid manifest (or the asked generation) and the highest generation number present."""
    names = _manifest_names(location)
    if not names:
        raise FileNotFoundError(
            f"no analogy collection at {location.uri!r} (no manifest-*.json there): save one with "
            "col.save(uri) or keras_clip_it.collections.storage.save_collection(col, uri)"
        )
    if generation is not None and generation not in names:
        raise FileNotFoundError(
            f"the collection at {location.uri!r} has no generation {generation}; it has {sorted(names)}"
        )
    candidates = [generation] if generation is not None else sorted(names, reverse=True)
    skipped = []
    for number in candidates:
        name = names[number]
        try:
            manifest = json.loads(location.read(name).decode("utf-8"))
        except FileNotFoundError:
            continue  # deleted by a compaction since the listing; an older one is no better
        except (UnicodeDecodeError, ValueError):
            skipped.append(f"{name} (not valid JSON: cut short by an interrupted write?)")
            continue
        if not isinstance(manifest, dict):
            skipped.append(f"{name} (not a JSON object)")
            continue
        _check_schema(manifest, location, name)
        if manifest.get("checksum") != _checksum(manifest):
            skipped.append(f"{name} (its checksum does not match: cut short or edited)")
            continue
        _check_manifest(manifest, location, name)
        if manifest["generation"] != number:
            raise CorruptCollectionError(
                f"{location.uri!r}: {name} says it is generation {manifest['generation']}: a renamed file? "
                "restore the original name"
            )
        if skipped:
            warnings.warn(
                f"collection {location.uri!r}: skipped {'; '.join(skipped)}; opened {name}, the state before "
                "it. compact() deletes the skipped manifest",
                stacklevel=3,
            )
        return manifest, max(names)
    raise CorruptCollectionError(
        f"no readable manifest in {location.uri!r}: {'; '.join(skipped) or 'manifests vanished while reading'}. "
        "Nothing was changed; restore a manifest from a backup or rebuild the collection"
    )


def _check_schema(manifest, location, name):
    version = manifest.get("schema_version")
    if manifest.get("format") != FORMAT or not isinstance(version, int):
        raise UnsupportedSchemaError(
            f"{location.uri!r}: {name} is not a keras-clip-it collection manifest (format "
            f"{manifest.get('format')!r}, schema_version {version!r})"
        )
    if version != SCHEMA_VERSION:
        advice = "upgrade keras-clip-it (pip install -U keras-clip-it)" if version > SCHEMA_VERSION else (
            "open it with the keras-clip-it version that wrote it"
        )
        raise UnsupportedSchemaError(
            f"{location.uri!r}: {name} uses storage schema version {version}, this keras-clip-it reads version "
            f"{SCHEMA_VERSION}: {advice}"
        )


def _check_manifest(manifest, location, name):
    """Structural checks, so that later code can index the manifest without surprises."""

    def require(condition, what):
        if not condition:
            raise CorruptCollectionError(
                f"{location.uri!r}: {name} is malformed ({what}); nothing was changed. Open an older generation "
                "(open_collection(uri, generation=...)) or rebuild the collection"
            )

    def file_entry(entry, what):
        require(isinstance(entry, dict), f"{what} is not an object")
        require(isinstance(entry.get("path"), str) and _SEGMENT_PATH.match(entry["path"]), f"{what} path")
        require(isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0, f"{what} bytes")
        require(isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64, f"{what} sha256")

    require(isinstance(manifest.get("generation"), int), "generation")
    require(isinstance(manifest.get("name"), str) and isinstance(manifest.get("language"), str), "name/language")
    require(isinstance(manifest.get("counts"), dict), "counts")
    encoders = manifest.get("encoders")
    require(isinstance(encoders, list), "encoders")
    keys = []
    for encoder in encoders:
        require(isinstance(encoder, dict) and encoder.get("kind") in KINDS, "encoder kind")
        require(isinstance(encoder.get("fingerprint"), str), "encoder fingerprint")
        require(isinstance(encoder.get("dims"), int) and encoder["dims"] > 0, "encoder dims")
        require(encoder.get("dtype") in DTYPES, "encoder dtype")
        keys.append((encoder["kind"], encoder["fingerprint"]))
    require(len(set(keys)) == len(keys), "an encoder is listed twice")
    segments = manifest.get("segments")
    require(isinstance(segments, list), "segments")
    for segment in segments:
        require(isinstance(segment, dict) and segment.get("type") in ("rows", "tombstones"), "segment type")
        require(isinstance(segment.get("rows"), int) and segment["rows"] >= 0, "segment rows")
        files = segment.get("files")
        require(isinstance(files, dict), "segment files")
        for column in COLUMNS if segment["type"] == "rows" else ("ids",):
            file_entry(files.get(column), f"segment {segment.get('name')!r} {column}")
        if segment["type"] == "rows":
            stored = segment.get("embeddings")
            require(isinstance(stored, list) and len(stored) == len(encoders), "segment embeddings")
            for entry, key in zip(stored, keys):
                listed = (entry.get("kind"), entry.get("fingerprint")) if isinstance(entry, dict) else None
                require(listed == key, "embeddings not in the order of the encoders")
                file_entry(entry.get("file"), f"segment {segment.get('name')!r} {key[0]} embeddings")
                if entry.get("scales") is not None:
                    file_entry(entry["scales"], f"segment {segment.get('name')!r} {key[0]} scales")


def _new_manifest(generation, name, language, encoders, segments):
    pairs = stored = removed = 0
    for segment in segments:
        if segment["type"] == "rows":
            stored += segment["rows"]
        else:
            removed += segment["rows"]
    pairs = stored - removed
    total_bytes = sum(entry["bytes"] for segment in segments for entry in _segment_files(segment))
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "generation": generation,
        "name": str(name),
        "language": str(language),
        "counts": {
            "pairs": pairs,
            "stored_rows": stored,
            "removed": removed,
            "segments": len(segments),
            "bytes": total_bytes,
        },
        "encoders": encoders,
        "segments": segments,
    }
    manifest["checksum"] = _checksum(manifest)
    return manifest


def _segment_files(segment):
    files = list(segment["files"].values())
    for entry in segment.get("embeddings", ()):
        files.append(entry["file"])
        if entry.get("scales") is not None:
            files.append(entry["scales"])
    return files


def _segment_name(generation):
    return f"{generation:08d}-{secrets.token_hex(4)}"


def _commit(location, manifest, keep):
    """Publishes `manifest`, then deletes what is no longer needed.

    An ordinary change keeps the manifest it was built on (`keep`): all its segments are still
    referenced, so it stays a readable fallback. With `keep=None` (compaction, snapshots) every older
    manifest is deleted before any segment, so no manifest ever outlives its segments, and then every
    file the new manifest does not reference.
    """
    name = f"manifest-{manifest['generation']:08d}.json"
    data = json.dumps(manifest, ensure_ascii=False, indent=1).encode("utf-8")
    try:
        location.publish(name, data)
    except _Taken:
        raise ConcurrentWriteError(
            f"another writer changed the collection at {location.uri!r} at the same time ({name} appeared): "
            "this change was not applied; retry it. Run compact() later to delete its unused files"
        ) from None
    for number, old in sorted(_manifest_names(location).items()):
        if number < manifest["generation"] and number != keep:
            location.delete(old)
    if keep is None:
        for entry in location.listdir():
            if _is_temporary_manifest(entry):
                location.delete(entry)
        referenced = {e["path"] for s in manifest["segments"] for e in _segment_files(s)}
        for entry in location.listdir(SEGMENTS):
            if f"{SEGMENTS}/{entry}" not in referenced:
                location.delete(f"{SEGMENTS}/{entry}")


# === Segments ===


def _write_rows_segment(location, name, columns, encoders, arrays):
    ids = columns["ids"]
    n = len(ids)
    # Everything is checked and encoded before the first byte is written.
    texts = {column: _jsonl(columns[column], column, ids) for column in COLUMNS}
    for encoder, (values, _) in zip(encoders, arrays):
        if values.shape != (n, encoder["dims"]):
            key = (encoder["kind"], encoder["fingerprint"])
            raise ValueError(f"{_keys([key])} embeddings have shape {values.shape}, expected {(n, encoder['dims'])}")
    files = {column: location.write_file(f"{SEGMENTS}/{name}.{column}.jsonl", [texts[column]]) for column in COLUMNS}
    stored = []
    for index, (encoder, (values, scales)) in enumerate(zip(encoders, arrays)):
        stem = f"{SEGMENTS}/{name}.{encoder['kind']}{index}"
        entry = {"kind": encoder["kind"], "fingerprint": encoder["fingerprint"]}
        entry["file"] = location.write_file(f"{stem}.npy", _npy_chunks(values))
        entry["scales"] = location.write_file(f"{stem}.scales.npy", _npy_chunks(scales)) if scales is not None else None
        stored.append(entry)
    return {"type": "rows", "name": name, "rows": n, "files": files, "embeddings": stored}


def _jsonl(values, column, ids=None):
    """One JSON value per line; strict JSON (no NaN) so that any reader can parse it."""
    try:
        lines = list(map(_JSON.encode, values))
    except (TypeError, ValueError):
        for row, value in enumerate(values):
            try:
                _JSON.encode(value)
            except (TypeError, ValueError) as error:
                where = f"pair {ids[row]!r}" if ids is not None else f"row {row}"
                raise TypeError(
                    f"{column} of {where} cannot be stored as JSON ({error}): use str, int, float, bool, None, "
                    "lists and dicts"
                ) from None
        raise
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


# One encoder for every value: json.dumps would rebuild it per call, which dominates for 1M short values.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


def _npy_chunks(array):
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    yield header.getvalue()
    flat = array.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _HASH_CHUNK):
        yield flat[start : start + _HASH_CHUNK].data


def _encode(array, dtype):
    """(stored values, per-row scales or None) for float32 rows in a storage dtype."""
    array = np.asarray(array, dtype=np.float32)
    if dtype == "float32":
        return array, None
    if dtype == "float16":
        return array.astype(np.float16), None
    peak = np.abs(array).max(axis=1) if array.size else np.zeros(array.shape[0], np.float32)
    scales = (peak / 127.0).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    return np.clip(np.rint(array / safe[:, None]), -127, 127).astype(np.int8), scales


def _decode(values, scales):
    if scales is None:
        return np.asarray(values, dtype=np.float32)
    return values.astype(np.float32) * scales[:, None]


class _Stored:
    """The live rows of one manifest: columns as lists, embeddings as per-segment arrays plus live masks."""

    def __init__(self, last_generation):
        self.last_generation = last_generation
        self.ids, self.captions, self.image_refs, self.metadata = [], [], [], []
        self.parts = {}  # (kind, fingerprint) -> [(stored values, scales or None, live rows or None)]

    def raw_embeddings(self, key):
        values, scales = [], []
        for stored, stored_scales, live in self.parts[key]:
            values.append(stored if live is None else stored[live])
            if stored_scales is not None:
                scales.append(stored_scales if live is None else stored_scales[live])
        return np.concatenate(values), (np.concatenate(scales) if scales else None)

    def float32_embeddings(self, key):
        parts = self.parts[key]
        if len(parts) == 1 and parts[0][1] is None and parts[0][2] is None and parts[0][0].dtype == np.float32:
            return parts[0][0]  # the memory map itself when local: nothing is read until used
        dims = parts[0][0].shape[1]
        out = np.empty((len(self.ids), dims), np.float32)
        start = 0
        for stored, scales, live in parts:
            if live is not None:
                stored, scales = stored[live], (scales[live] if scales is not None else None)
            out[start : start + len(stored)] = _decode(stored, scales)
            start += len(stored)
        return out


def _open_stored(location, verify, generation, embeddings):
    """Reads and checks one manifest's segments, retrying if a compaction replaced them meanwhile."""
    for attempt in range(3):
        manifest, last = _read_manifest(location, generation)
        try:
            return manifest, _load_segments(location, manifest, last, verify, embeddings)
        except _Missing as missing:
            replaced = generation is None and max(_manifest_names(location), default=0) != manifest["generation"]
            if replaced and attempt < 2:
                continue
            raise CorruptCollectionError(
                f"{location.uri!r}: {missing.path}, listed in manifest-{manifest['generation']:08d}.json, is "
                f"missing. Nothing was changed; restore the file, open an older generation "
                f"(info(uri)['generations']) or rebuild the collection"
            ) from None


class _Missing(Exception):
    def __init__(self, path):
        super().__init__(path)
        self.path = path


def _load_segments(location, manifest, last, verify, embeddings):
    generation = manifest["generation"]

    def corrupt(path, what):
        return CorruptCollectionError(
            f"{location.uri!r}: {path} {what}. Nothing was changed; restore the file from a backup, open an "
            f"older generation than {generation} (open_collection(uri, generation=...)) if it does not list the "
            "file, or rebuild the collection"
        )

    def checked_bytes(entry):
        try:
            data = location.read(entry["path"])
        except FileNotFoundError:
            raise _Missing(entry["path"]) from None
        if len(data) != entry["bytes"]:
            raise corrupt(entry["path"], f"has {len(data)} bytes, the manifest says {entry['bytes']} (truncated?)")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise corrupt(entry["path"], "does not match its sha256 checksum (damaged or edited)")
        return data

    def jsonl(entry, rows):
        data = checked_bytes(entry)
        try:
            text = data.decode("utf-8")
            values = json.loads("[" + text[:-1].replace("\n", ",") + "]") if text else []
        except ValueError as error:
            raise corrupt(entry["path"], f"is not JSON lines ({error})") from None
        if len(values) != rows:
            raise corrupt(entry["path"], f"has {len(values)} lines, the manifest says {rows}")
        return values

    def array(entry, shape, dtype):
        path = entry["path"]
        try:
            size = location.size(path)
        except FileNotFoundError:
            raise _Missing(path) from None
        if size != entry["bytes"]:
            raise corrupt(path, f"has {size} bytes, the manifest says {entry['bytes']} (truncated?)")
        try:
            if location.local and shape[0] > 0:
                if verify and location.sha256(path) != entry["sha256"]:
                    raise corrupt(path, "does not match its sha256 checksum (damaged or edited)")
                values = np.load(location.path(path), mmap_mode="c", allow_pickle=False)
            else:
                data = checked_bytes(entry) if verify else location.read(path)
                values = np.load(io.BytesIO(data), allow_pickle=False)
        except CorruptCollectionError:
            raise
        except FileNotFoundError:
            raise _Missing(path) from None
        except (ValueError, EOFError, OSError) as error:
            raise corrupt(path, f"is not a readable .npy array ({error})") from None
        if values.shape != shape or values.dtype != np.dtype(dtype):
            raise corrupt(path, f"holds {values.dtype} {values.shape}, the manifest says {dtype} {shape}")
        return values

    stored = _Stored(last)
    columns = COLUMNS if embeddings else ("ids",)
    all_columns = {column: [] for column in columns}
    row_of = {}
    segment_rows = []  # (segment, first global row)
    dead = []
    total = 0
    for segment in manifest["segments"]:
        if segment["type"] == "tombstones":
            for pair_id in jsonl(segment["files"]["ids"], segment["rows"]):
                row = row_of.pop(pair_id, None)
                if row is None:
                    path = segment["files"]["ids"]["path"]
                    raise corrupt(path, f"removes id {pair_id!r}, which no earlier segment holds alive")
                dead.append(row)
            continue
        n = segment["rows"]
        values = {column: jsonl(segment["files"][column], n) for column in columns}
        new = dict(zip(values["ids"], range(total, total + n)))
        if len(new) != n or not row_of.keys().isdisjoint(new):
            repeated = sorted(_repeated(values["ids"]) | (row_of.keys() & new.keys()))
            raise corrupt(segment["files"]["ids"]["path"], f"repeats ids that are already alive: {_preview(repeated)}")
        if not set(map(type, values["ids"])) <= {str}:
            raise corrupt(segment["files"]["ids"]["path"], "holds ids that are not strings")
        row_of.update(new)
        for column in columns:
            all_columns[column].extend(values[column])
        segment_rows.append((segment, total))
        total += n
    alive = None
    if dead:
        alive = np.ones(total, bool)
        alive[dead] = False
        keep = np.flatnonzero(alive).tolist()
        for column in columns:
            everything = all_columns[column]
            all_columns[column] = [everything[row] for row in keep]
    for column in columns:
        setattr(stored, column, all_columns[column])
    if embeddings:
        for index, encoder in enumerate(manifest["encoders"]):
            key = (encoder["kind"], encoder["fingerprint"])
            stored.parts[key] = parts = []
            for segment, first in segment_rows:
                n = segment["rows"]
                entry = segment["embeddings"][index]
                values = array(entry["file"], (n, encoder["dims"]), encoder["dtype"])
                scales = array(entry["scales"], (n,), "float32") if encoder["dtype"] == "int8" else None
                mask = None if alive is None else alive[first : first + n]
                live = None if mask is None or mask.all() else np.flatnonzero(mask)
                parts.append((values, scales, live))
            if not parts:
                empty_scales = np.zeros(0, np.float32) if encoder["dtype"] == "int8" else None
                parts.append((np.zeros((0, encoder["dims"]), encoder["dtype"]), empty_scales, None))
    return stored


# === Input checks ===


def _check_dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def _encoder_entry(kind, fingerprint, dims, dtype):
    return {"kind": kind, "fingerprint": str(fingerprint), "dims": int(dims), "dtype": dtype}


def _embeddings_by_key(embeddings, n):
    out = {}
    for kind, by_fingerprint in (embeddings or {}).items():
        if kind not in KINDS:
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


def _as_ids(ids):
    if isinstance(ids, str):
        raise TypeError(f"ids must be a list of strings, got the single string {ids!r}: wrap it in a list")
    return [str(i) for i in ids]


def _aligned(values, n, what):
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{len(values)} {what} for {n} ids")
    return values


def _repeated(ids):
    seen, repeated = set(), set()
    for i in ids:
        (repeated if i in seen else seen).add(i)
    return repeated


def _keys(keys):
    return "[" + ", ".join(f"{kind}:{str(fp)[:12]}" for kind, fp in keys) + "]"


def _preview(items, limit=10):
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
