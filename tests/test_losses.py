import keras
import numpy as np
import pytest

import keras_clip_it as kci


def normalised(rng, count, dim=6):
    x = rng.normal(size=(count, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def log_softmax(logits):
    logits = logits - logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def reference_contrastive(images, texts, scale, smoothing=0.0):
    logits = scale * images @ texts.T
    count = len(images)
    targets = np.eye(count) * (1 - smoothing) + smoothing / count
    image_to_text = -(targets * log_softmax(logits)).sum(1)
    text_to_image = -(targets * log_softmax(logits.T)).sum(1)
    return float(np.mean((image_to_text + text_to_image) / 2))


def reference_sigmoid(images, texts, scale, bias):
    logits = scale * images @ texts.T + bias
    signs = 2 * np.eye(len(images)) - 1
    return float(np.mean(np.log1p(np.exp(-signs * logits)).sum(1)))


def scores(images, texts, scale, bias=None):
    y_pred = {"image_embeddings": images, "text_embeddings": texts, "logit_scale": np.float32(scale)}
    if bias is not None:
        y_pred["logit_bias"] = np.float32(bias)
    return y_pred


@pytest.mark.tf_parity
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_contrastive_loss_matches_reference(smoothing):
    rng = np.random.RandomState(0)
    images, texts = normalised(rng, 5), normalised(rng, 5)
    loss = kci.losses.ContrastiveLoss(label_smoothing=smoothing)({}, scores(images, texts, 14.3))
    np.testing.assert_allclose(float(loss), reference_contrastive(images, texts, 14.3, smoothing), rtol=1e-5)


@pytest.mark.tf_parity
def test_sigmoid_loss_matches_reference():
    rng = np.random.RandomState(1)
    images, texts = normalised(rng, 4), normalised(rng, 4)
    loss = kci.losses.SigmoidLoss()({}, scores(images, texts, 10.0, -10.0))
    np.testing.assert_allclose(float(loss), reference_sigmoid(images, texts, 10.0, -10.0), rtol=1e-5)


def test_losses_reward_matching_pairs():
    rng = np.random.RandomState(2)
    images = normalised(rng, 6)
    shuffled = images[::-1].copy()
    for loss, bias in [(kci.losses.ContrastiveLoss(), None), (kci.losses.SigmoidLoss(), 0.0)]:
        assert float(loss({}, scores(images, images, 10.0, bias))) < float(loss({}, scores(images, shuffled, 10.0, bias)))


def test_loss_is_float32_for_bfloat16_embeddings():
    rng = np.random.RandomState(3)
    images = keras.ops.cast(normalised(rng, 4), "bfloat16")
    loss = kci.losses.ContrastiveLoss()({}, scores(images, images, 20.0))
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="label_smoothing"):
        kci.losses.ContrastiveLoss(label_smoothing=1.0)
    with pytest.raises(ValueError, match="DualEncoder"):
        kci.losses.ContrastiveLoss()({}, np.zeros((2, 2), np.float32))
    rng = np.random.RandomState(4)
    with pytest.raises(ValueError, match="logit_bias"):
        kci.losses.SigmoidLoss()({}, scores(normalised(rng, 2), normalised(rng, 2), 10.0))


def test_config_roundtrip():
    loss = kci.losses.ContrastiveLoss(label_smoothing=0.2)
    rebuilt = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(rebuilt, kci.losses.ContrastiveLoss) and rebuilt.label_smoothing == 0.2


def test_gather_batch_passes_through_on_one_device():
    rng = np.random.RandomState(5)
    images, texts = normalised(rng, 3), normalised(rng, 3)
    all_images, all_texts, offset = kci.losses.gather_batch(images, texts)
    assert all_images is images and all_texts is texts and offset == 0
    (all_texts, offset) = kci.losses.gather_batch(texts)
    assert all_texts is texts and offset == 0
