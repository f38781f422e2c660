"""The TextEncoder behaviours every text tower relies on, on a small random BERT (fast, no weights needed)."""

import keras
import keras_hub
import numpy as np
import pytest

import keras_clip_it as kci
from keras_clip_it.encoders.minilm.hf_bert_tokenizer import HFBertTokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "the", "sat", "on", "mat", "caffe", "!"]
TEXTS = ["the cat sat on the mat", "a dog!", "caffè", "the dog sat on a cat on a mat ! " * 5, "", "cat"]


def make_encoder(sequence_length=32, **kwargs):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCAB), num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=64, dropout=0.0,
    )
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(HFBertTokenizer(VOCAB), sequence_length=sequence_length)
    return kci.TextEncoder(backbone, preprocessor, **kwargs)


@pytest.fixture(scope="module")
def encoder():
    return make_encoder()


def test_masked_mean_pooling_ignores_padding(encoder):
    tokens = encoder.tokenize(["the cat sat"])
    real = tokens["padding_mask"][0].astype(bool)
    sequence = np.asarray(encoder.backbone(tokens)["sequence_output"])[0]
    pooled = np.asarray(encoder(tokens))[0]
    np.testing.assert_allclose(pooled, sequence[real].mean(axis=0), atol=1e-5)
    # Whatever sits in the padded positions, and however many there are, the vector is the same.
    noisy = {**tokens, "token_ids": np.where(real, tokens["token_ids"], 7).astype(np.int32)}
    np.testing.assert_allclose(np.asarray(encoder(noisy))[0], pooled, atol=1e-5)
    short = {name: value[:, :8] for name, value in tokens.items()}
    np.testing.assert_allclose(np.asarray(encoder(short))[0], pooled, atol=1e-5)


def test_batching_gives_the_same_rows_as_one_by_one(encoder):
    together = encoder.embed(TEXTS, batch_size=4)  # a full batch, then a padded one of 2 rows
    alone = np.concatenate([encoder.embed([text]) for text in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(encoder.embed(TEXTS, batch_size=64), alone, atol=1e-5)


def test_embed_returns_unit_float32_rows(encoder):
    vectors = encoder.embed(TEXTS)
    assert vectors.shape == (len(TEXTS), encoder.embedding_dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(encoder.embed("cat"), vectors[-1:], atol=1e-6)  # one string is one row


def test_embed_of_an_empty_list(encoder):
    vectors = encoder.embed([])
    assert vectors.shape == (0, encoder.embedding_dim) and vectors.dtype == np.float32


@pytest.mark.parametrize("texts", [["a cat", 3], [None], [b"bytes"]])
def test_non_string_input_is_a_clear_error(encoder, texts):
    index = len(texts) - 1
    with pytest.raises(TypeError, match=f"text {index} is a .*not a string"):
        encoder.embed(texts)


def test_tokenize_gives_every_backbone_input_as_int32(encoder):
    tokens = encoder.tokenize(TEXTS)
    assert sorted(tokens) == ["padding_mask", "segment_ids", "token_ids"]
    for value in tokens.values():
        assert value.dtype == np.int32 and value.shape == (len(TEXTS), encoder.sequence_length)
    # Too long for 32 tokens: truncated with the end token kept, every position real.
    assert tokens["padding_mask"][3].all() and tokens["token_ids"][3, -1] == VOCAB.index("[SEP]")


def test_prefix_is_put_before_every_text():
    prefixed = make_encoder(prefix="the ")
    plain = make_encoder()
    np.testing.assert_array_equal(prefixed.tokenize(["cat"])["token_ids"], plain.tokenize(["the cat"])["token_ids"])



def test_repeated_predictions_follow_weight_and_structure_changes(tmp_path):
    """`predict_on_batch` keeps its compiled inference and variable list between calls; every change that
    alters the computation must show in the next call's outputs, as in a fresh encoder."""
    encoder = make_encoder()
    tokens = encoder.tokenize(TEXTS[:4])

    def predict(model=encoder):
        return np.asarray(model.predict_on_batch(tokens))

    first = predict()
    np.testing.assert_array_equal(predict(), first)  # the cached path
    np.testing.assert_allclose(np.asarray(keras.Model.predict_on_batch(encoder, tokens)), first, atol=1e-6)

    # New values in the same variables: set_weights, a direct assign, load_weights.
    weights = encoder.get_weights()
    scaled_weights = [w * 1.5 if w.dtype.kind == "f" else w for w in weights]
    encoder.set_weights(scaled_weights)
    scaled = predict()
    assert np.abs(scaled - first).max() > 1e-3
    np.testing.assert_allclose(np.asarray(keras.Model.predict_on_batch(encoder, tokens)), scaled, atol=1e-6)
    encoder.backbone.token_embedding.embeddings.assign(np.zeros_like(weights[0]))
    assert np.abs(predict() - scaled).max() > 1e-3
    encoder.set_weights(weights)
    encoder.save_weights(str(tmp_path / "first.weights.h5"))
    encoder.set_weights(scaled_weights)
    encoder.load_weights(str(tmp_path / "first.weights.h5"))
    np.testing.assert_allclose(predict(), first, atol=1e-6)

    # Freezing does not change what inference computes: on JAX nothing is rebuilt.
    from keras_clip_it.encoders import base

    compiled = base._state(encoder).inference
    encoder.backbone.transformer_layers[0].trainable = False
    np.testing.assert_array_equal(predict(), first)
    assert base._state(encoder).inference is compiled

    # New variables (LoRA adapters, moved away from their zero start), then a new dtype policy: the same
    # outputs as a fresh encoder given the same changes, and not the old ones.
    fresh = make_encoder()
    for model in (encoder, fresh):
        model.backbone.enable_lora(2)
    for variable in encoder.backbone.variables:
        if "lora_kernel_b" in variable.path:
            variable.assign(np.full(variable.shape, 0.5, np.float32))
    fresh.set_weights(encoder.get_weights())
    lora = predict()
    assert np.abs(lora - first).max() > 1e-3
    np.testing.assert_allclose(lora, predict(fresh), atol=1e-6)
    for model in (encoder, fresh):
        for layer in model.backbone._flatten_layers():
            layer.dtype_policy = "mixed_bfloat16"
    half = predict()
    assert np.abs(half - lora).max() > 1e-4
    np.testing.assert_allclose(half, predict(fresh), atol=1e-6)
