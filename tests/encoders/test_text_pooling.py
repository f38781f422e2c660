import keras_hub
import numpy as np
import pytest

import keras_clip_it as kci

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "the", "sat"]


def preprocessor(length=12):
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCAB)
    return keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=length)


def causal_backbone():
    """A CLIP-style text tower: causal attention, no padding mask input."""
    return keras_hub.models.CLIPTextEncoder(
        vocabulary_size=len(VOCAB), embedding_dim=8, hidden_dim=8, num_layers=1, num_heads=2,
        intermediate_dim=16, max_sequence_length=12,
    )


def test_last_pooling_takes_the_end_token_and_ignores_padding():
    encoder = kci.TextEncoder(causal_backbone(), preprocessor(length=8), pooling="last")
    texts = ["the cat", "a dog sat"]
    tokens = encoder.tokenize(texts)
    sequence = np.asarray(encoder.backbone({"token_ids": tokens["token_ids"]}))
    ends = tokens["padding_mask"].sum(axis=1) - 1
    expected = sequence[np.arange(2), ends]
    np.testing.assert_allclose(np.asarray(encoder(tokens)), expected, atol=1e-6)
    # Causal attention: the end token never sees the padding, so any padded length gives the same vector.
    longer = kci.TextEncoder(encoder.backbone, preprocessor(length=12), pooling="last")
    np.testing.assert_allclose(longer.embed(texts), encoder.embed(texts), atol=1e-6)


def test_mean_pooling_ignores_padding():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCAB), num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16,
        max_sequence_length=12,
    )
    encoder = kci.TextEncoder(backbone, preprocessor(), pooling="mean")
    tokens = encoder.tokenize(["the cat sat"])
    sequence = np.asarray(backbone(tokens)["sequence_output"])[0]
    real = tokens["padding_mask"][0].astype(bool)
    np.testing.assert_allclose(np.asarray(encoder(tokens))[0], sequence[real].mean(axis=0), atol=1e-5)
    cls = kci.TextEncoder(backbone, preprocessor(), pooling="cls")
    np.testing.assert_allclose(np.asarray(cls(tokens))[0], sequence[0], atol=1e-6)


def test_pooled_needs_a_pooled_output():
    with pytest.raises(ValueError, match="pooled_output"):
        kci.TextEncoder(causal_backbone(), preprocessor(), pooling="pooled")
