"""LiT feature caching: features computed once, a stand-in tower trained on them, heads moved back."""

import keras
import numpy as np
import pytest

import keras_clip_it as kci
from keras_clip_it.models.feature_cache import CachedFeatures
from keras_clip_it.models.feature_cache import cached_features
from keras_clip_it.models.feature_cache import copy_heads
from keras_clip_it.models.feature_cache import feature_pairs
from tests.helpers import assert_config_roundtrip
from tests.models.test_dual_encoder_towers import tiny_image_encoder
from tests.models.test_dual_encoder_towers import tiny_pairs
from tests.models.test_dual_encoder_towers import tiny_text_encoder


def test_features_are_computed_once_per_encoder_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_CLIP_IT_CACHE", str(tmp_path))
    encoder = tiny_image_encoder("cnn")
    images, _ = tiny_pairs(8)
    features = cached_features(encoder, images, key="tiny")
    np.testing.assert_allclose(features, encoder.embed(images), atol=1e-6)

    def no_second_run(*args, **kwargs):
        raise AssertionError("the cached features were computed again")

    monkeypatch.setattr(encoder, "embed", no_second_run)
    np.testing.assert_array_equal(cached_features(encoder, images, key="tiny"), features)
    assert [name for name in (tmp_path / "features").iterdir() if name.suffix != ".npy"] == []


@pytest.mark.tf_parity
def test_heads_trained_on_cached_features_serve_the_real_tower(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_CLIP_IT_CACHE", str(tmp_path))
    image_encoder, text_encoder = tiny_image_encoder("cnn"), tiny_text_encoder()
    images, captions = tiny_pairs(16)
    model = kci.DualEncoder(image_encoder, text_encoder, projection_dim=8)
    model.lock("image")
    features = cached_features(image_encoder, images, key="tiny")

    trainer = kci.DualEncoder(CachedFeatures(image_encoder.embedding_dim), text_encoder, projection_dim=8)
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-2))
    heads = trainer.image_projection.get_weights()[0].copy()
    trainer.fit(feature_pairs(features, text_encoder.tokenize(captions), batch_size=8, seed=0), epochs=1, verbose=0)
    assert not np.allclose(heads, trainer.image_projection.get_weights()[0])

    copy_heads(trainer, model)
    np.testing.assert_allclose(model.encode_images(images), trainer.encode_images(list(features)), atol=2e-3)
    np.testing.assert_allclose(model.encode_texts(captions), trainer.encode_texts(captions), atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.logit_scale),
                               keras.ops.convert_to_numpy(trainer.logit_scale))


def test_cached_features_layer_config_roundtrip():
    layer = CachedFeatures(16)
    assert layer.embedding_dim == 16 and layer.name == "cached_image_features"
    assert_config_roundtrip(layer)
    np.testing.assert_array_equal(layer.preprocess([np.ones(16), np.zeros(16)]).shape, (2, 16))
