import json

import keras
import keras_hub
import numpy as np
import pytest

import keras_clip_it as kci
from tests.helpers import assert_config_roundtrip
from tests.helpers import assert_keras_roundtrip


def tiny_encoder(pooling="cls", head=None, class_names=None):
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    return kci.ImageEncoder(backbone, image_size=32, crop_pct=1.0, pooling=pooling, head=head, class_names=class_names)


def images(count=5, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (count, 40, 48, 3)).astype(np.uint8)


@pytest.mark.tf_parity
def test_embed_is_normalised_and_independent_of_batching():
    encoder = tiny_encoder()
    batch = encoder.embed(images(5), batch_size=4)
    assert batch.shape == (5, 16) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([encoder.embed(image) for image in images(5)])
    np.testing.assert_allclose(one_by_one, batch, atol=1e-5)
    assert encoder.embed([]).shape == (0, 16)


def test_normalisation_happens_inside_the_model():
    encoder = tiny_encoder()
    pixels = encoder.preprocess(images(2))
    manual = (pixels / 255.0 - np.array(encoder.mean)) / np.array(encoder.std)
    expected = encoder.backbone(manual.astype(np.float32))[:, 0]
    np.testing.assert_allclose(np.asarray(encoder(pixels)), np.asarray(expected), atol=1e-5)


def test_pooling_modes():
    encoder = tiny_encoder(pooling="avg")
    pixels = encoder.preprocess(images(2)).astype(np.float32)
    tokens = encoder.backbone((pixels / 255.0 - np.array(encoder.mean, np.float32)) / np.array(encoder.std, np.float32))
    np.testing.assert_allclose(np.asarray(encoder(pixels)), np.asarray(tokens).mean(axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        tiny_encoder(pooling="max")


@pytest.mark.tf_parity
def test_keras_roundtrip_with_head(tmp_path):
    encoder = tiny_encoder(head=keras.layers.Dense(3), class_names=["gatto", "cane", "pesce"])
    assert_config_roundtrip(encoder)
    reloaded = assert_keras_roundtrip(encoder, lambda model: model.embed(images(3)), tmp_path)
    assert reloaded.fingerprint == encoder.fingerprint
    assert reloaded.classify(images(1))[0] == encoder.classify(images(1))[0]


def test_classify_ranks_the_head_classes():
    encoder = tiny_encoder(head=keras.layers.Dense(3), class_names=["gatto", "cane", "pesce"])
    (top,) = encoder.classify(images(1), top_k=3)
    assert sorted(name for name, _ in top) == ["cane", "gatto", "pesce"]
    probabilities = [probability for _, probability in top]
    assert probabilities == sorted(probabilities, reverse=True)
    assert abs(sum(probabilities) - 1.0) < 1e-5
    with pytest.raises(ValueError, match="no classification head"):
        tiny_encoder().classify(images(1))
    with pytest.raises(ValueError, match="3 classes but 2"):
        tiny_encoder(head=keras.layers.Dense(3), class_names=["a", "b"])


def test_fingerprint_follows_weights_not_names():
    first, second = tiny_encoder(), tiny_encoder()
    second.set_weights(first.get_weights())
    assert first.fingerprint == second.fingerprint  # different layer names, same computation
    weights = second.get_weights()
    weights[0] = weights[0] + 1.0
    second.set_weights(weights)
    assert first.fingerprint != second.fingerprint


def test_unknown_presets_fail_with_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="no directory"):
        kci.ImageEncoder.from_preset("./no/such/dir")
    with pytest.raises(FileNotFoundError, match="config.json"):
        kci.ImageEncoder.from_preset(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        kci.ImageEncoder.from_preset(str(tmp_path))


def test_remote_presets_fail_fast_offline(monkeypatch):
    from keras_clip_it.encoders import presets

    monkeypatch.setattr(presets, "_reachable", lambda host, timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ConnectionError, match="offline.*efficientnet_lite0_imagenet|offline"):
        kci.ImageEncoder.from_preset("hf://google/vit-base-patch16-224")
    with pytest.raises(ConnectionError, match="www.kaggle.com"):
        kci.ImageEncoder.from_preset("efficientnet_lite0_ra_imagenet")
