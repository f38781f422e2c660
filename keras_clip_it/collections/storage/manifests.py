"""Manifests: the numbered, self-checksummed JSON files that say which segments make up a state.

Reading picks the highest generation whose checksum holds and whose structure is sound; committing
publishes a new generation and then deletes what no kept manifest references.
"""

import hashlib
import json
import re
import secrets
import warnings

from keras_clip_it.collections.storage.errors import ConcurrentWriteError
from keras_clip_it.collections.storage.errors import CorruptCollectionError
from keras_clip_it.collections.storage.errors import UnsupportedSchemaError
from keras_clip_it.collections.storage.locations import SEGMENTS
from keras_clip_it.collections.storage.locations import Taken
from keras_clip_it.collections.storage.locations import is_temporary_manifest

SCHEMA_VERSION = 1
FORMAT = "keras-clip-it analogy collection"
DTYPES = ("float32", "float16", "int8")
KINDS = ("image", "text")
COLUMNS = ("ids", "captions", "image_refs", "metadata")
_MANIFEST_NAME = re.compile(r"^manifest-(\d{8})\.json$")
_SEGMENT_PATH = re.compile(r"^segments/[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


def manifest_names(location):
    """{generation: file name} of every manifest file present, valid or not."""
    found = {}
    for name in location.listdir():
        match = _MANIFEST_NAME.match(name)
        if match:
            found[int(match.group(1))] = name
    return found


def checksum(manifest):
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(location, generation):
    """The newest valid manifest (or the asked generation) and the highest generation number present."""
    names = manifest_names(location)
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
        if manifest.get("checksum") != checksum(manifest):
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


def new_manifest(generation, name, language, encoders, segments):
    pairs = stored = removed = 0
    for segment in segments:
        if segment["type"] == "rows":
            stored += segment["rows"]
        else:
            removed += segment["rows"]
    pairs = stored - removed
    total_bytes = sum(entry["bytes"] for segment in segments for entry in segment_files(segment))
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
    manifest["checksum"] = checksum(manifest)
    return manifest


def segment_files(segment):
    files = list(segment["files"].values())
    for entry in segment.get("embeddings", ()):
        files.append(entry["file"])
        if entry.get("scales") is not None:
            files.append(entry["scales"])
    return files


def segment_name(generation):
    return f"{generation:08d}-{secrets.token_hex(4)}"


def commit(location, manifest, keep):
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
    except Taken:
        raise ConcurrentWriteError(
            f"another writer changed the collection at {location.uri!r} at the same time ({name} appeared): "
            "this change was not applied; retry it. Run compact() later to delete its unused files"
        ) from None
    for number, old in sorted(manifest_names(location).items()):
        if number < manifest["generation"] and number != keep:
            location.delete(old)
    if keep is None:
        for entry in location.listdir():
            if is_temporary_manifest(entry):
                location.delete(entry)
        referenced = {e["path"] for s in manifest["segments"] for e in segment_files(s)}
        for entry in location.listdir(SEGMENTS):
            if f"{SEGMENTS}/{entry}" not in referenced:
                location.delete(f"{SEGMENTS}/{entry}")
