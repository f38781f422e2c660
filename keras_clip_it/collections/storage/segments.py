"""Segments: writing and loading the immutable files of a state (JSON lines columns, .npy embeddings).

Embeddings are stored as float32, float16, or int8 with per-row float32 scales; loading checks every
file against its manifest entry and memory-maps float32 arrays on local disks.
"""

import hashlib
import io
import json

import numpy as np

from keras_clip_it.collections.storage.errors import CorruptCollectionError
from keras_clip_it.collections.storage.errors import encoder_keys
from keras_clip_it.collections.storage.errors import preview
from keras_clip_it.collections.storage.locations import HASH_CHUNK
from keras_clip_it.collections.storage.locations import SEGMENTS
from keras_clip_it.collections.storage.manifests import COLUMNS
from keras_clip_it.collections.storage.manifests import manifest_names
from keras_clip_it.collections.storage.manifests import read_manifest


def write_rows_segment(location, name, columns, encoders, arrays):
    ids = columns["ids"]
    n = len(ids)
    # Everything is checked and encoded before the first byte is written.
    texts = {column: jsonl(columns[column], column, ids) for column in COLUMNS}
    for encoder, (values, _) in zip(encoders, arrays):
        if values.shape != (n, encoder["dims"]):
            key = (encoder["kind"], encoder["fingerprint"])
            expected = (n, encoder["dims"])
            raise ValueError(f"{encoder_keys([key])} embeddings have shape {values.shape}, expected {expected}")
    files = {column: location.write_file(f"{SEGMENTS}/{name}.{column}.jsonl", [texts[column]]) for column in COLUMNS}
    stored = []
    for index, (encoder, (values, scales)) in enumerate(zip(encoders, arrays)):
        stem = f"{SEGMENTS}/{name}.{encoder['kind']}{index}"
        entry = {"kind": encoder["kind"], "fingerprint": encoder["fingerprint"]}
        entry["file"] = location.write_file(f"{stem}.npy", _npy_chunks(values))
        entry["scales"] = location.write_file(f"{stem}.scales.npy", _npy_chunks(scales)) if scales is not None else None
        stored.append(entry)
    return {"type": "rows", "name": name, "rows": n, "files": files, "embeddings": stored}


def jsonl(values, column, ids=None):
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
    for start in range(0, flat.size, HASH_CHUNK):
        yield flat[start : start + HASH_CHUNK].data


def encode(array, dtype):
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


def open_stored(location, verify, generation, embeddings):
    """Reads and checks one manifest's segments, retrying if a compaction replaced them meanwhile."""
    for attempt in range(3):
        manifest, last = read_manifest(location, generation)
        try:
            return manifest, _load_segments(location, manifest, last, verify, embeddings)
        except _Missing as missing:
            replaced = generation is None and max(manifest_names(location), default=0) != manifest["generation"]
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
            again = sorted(repeated(values["ids"]) | (row_of.keys() & new.keys()))
            raise corrupt(segment["files"]["ids"]["path"], f"repeats ids that are already alive: {preview(again)}")
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


def repeated(ids):
    """The ids that occur more than once in `ids`."""
    seen, twice = set(), set()
    for i in ids:
        (twice if i in seen else seen).add(i)
    return twice
