import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_clip_it as kci
from tests.helpers import assert_keras_roundtrip
from tests.models.test_dual_encoder_towers import tiny_model
from tests.models.test_dual_encoder_towers import tiny_pairs
from tests.models.test_dual_encoder_towers import tokenized_batch


def dataset(model, count=32, batch_size=8):
    images, captions = tiny_pairs(count)
    return kci.data.pairs(images, captions, model=model, batch_size=batch_size, seed=0)


def weights_of(layer):
    return [np.array(w) for w in layer.weights]


def changed(before, after):
    return any(not np.allclose(a, b) for a, b in zip(before, after))


def count_traces(model):
    """Counts Python executions of compute_loss: once per trace of the compiled train step."""
    counts = {"loss": 0}
    original = model.compute_loss

    def counting(x=None, y=None, y_pred=None, sample_weight=None, training=True):
        counts["loss"] += 1
        return original(x, y, y_pred, sample_weight, training)

    model.compute_loss = counting
    return counts


@pytest.mark.tf_parity
def test_embeddings_are_normalised_and_towers_run_alone():
    model = tiny_model()
    batch = tokenized_batch(model)
    outputs = model(batch)
    for key in ("image_embeddings", "text_embeddings"):
        assert outputs[key].shape == (8, 8)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(outputs[key]), axis=1), 1.0, atol=1e-5)
    images_only = model({"images": batch["images"]})
    assert set(images_only) == {"image_embeddings"}
    np.testing.assert_allclose(images_only["image_embeddings"], outputs["image_embeddings"], atol=1e-6)
    with pytest.raises(ValueError, match="encode_images"):
        model(batch["images"])


def test_fit_needs_no_labels_and_learns():
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.AdamW(3e-3))
    history = model.fit(dataset(model), epochs=6, verbose=0).history
    assert set(history) == {"loss", "image_to_text_top1", "text_to_image_top1"}
    assert history["loss"][-1] < 0.6 * history["loss"][0]
    assert history["image_to_text_top1"][-1] > 0.3  # chance is 1/8


@pytest.mark.tf_parity
def test_fit_evaluate_and_predict_turn_tf_data_autotuning_off(monkeypatch):
    # On TensorFlow, Keras deletes the iterator when fit/evaluate/predict end, which waits for tf.data's
    # autotuning thread to wake up: a hand-built pipeline reaches Keras with that thread off.
    model = tiny_model()
    model.compile()
    images, captions = tiny_pairs(16)
    batches = tf.data.Dataset.from_tensor_slices({"images": images, "texts": model.text_encoder.tokenize(captions)})
    batches = batches.batch(8, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    assert batches.options().autotune.enabled is None
    received = []
    for method in ("fit", "evaluate", "predict"):
        original = getattr(keras.Model, method)

        def recording(self, x=None, *args, _original=original, _method=method, **kwargs):
            received.append((_method, x, kwargs.get("validation_data")))
            return _original(self, x, *args, **kwargs)

        monkeypatch.setattr(keras.Model, method, recording)
    history = model.fit(batches, epochs=1, verbose=0, validation_data=batches).history
    assert "val_loss" in history
    assert model.predict(batches, verbose=0)["image_embeddings"].shape == (16, 8)
    # fit's validation runs through evaluate: every dataset Keras got has autotuning off.
    assert [method for method, _, _ in received] == ["fit", "evaluate", "predict"]
    assert received[0][2] is not None
    for _, x, validation in received:
        for dataset in (x, validation) if validation is not None else (x,):
            assert dataset.options().autotune.enabled is False


def test_one_forward_pass_and_no_retrace_after_the_first_step():
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    calls = {"image": 0}
    original_call = model.image_encoder.call

    def counting_call(*args, **kwargs):
        calls["image"] += 1
        return original_call(*args, **kwargs)

    model.image_encoder.call = counting_call
    traces = count_traces(model)
    data = dataset(model)
    model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
    after_first = dict(traces), dict(calls)
    model.fit(data, epochs=3, verbose=0)
    if keras.backend.backend() == "jax":
        assert traces["loss"] == after_first[0]["loss"] == 1
        assert calls == after_first[1]  # the tower is not even called again from Python
    # One tower call per traced loss: a single forward pass feeds the loss and the metrics.
    assert after_first[1]["image"] <= after_first[0]["loss"] + 1


def test_compute_loss_uses_the_logit_scale():
    model = tiny_model(logit_scale=20.0, learn_logit_scale=False)
    model.compile()
    batch = tokenized_batch(model)
    outputs = model(batch)
    images, texts = np.asarray(outputs["image_embeddings"]), np.asarray(outputs["text_embeddings"])
    logits = 20.0 * images @ texts.T
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    log_probs_t = logits.T - np.log(np.exp(logits.T).sum(1, keepdims=True))
    expected = -(np.diag(log_probs) + np.diag(log_probs_t)).mean() / 2
    np.testing.assert_allclose(float(model.compute_loss(batch, None, outputs)), expected, rtol=1e-4)
    assert all(v is not model.log_logit_scale for v in model.trainable_variables)


def test_learned_logit_scale_starts_at_clip_value_and_is_clamped_at_100():
    model = tiny_model()
    np.testing.assert_allclose(float(model.logit_scale), 1 / 0.07, rtol=1e-5)
    model.log_logit_scale.assign(math.log(100.0) - 1e-4)
    model.compile(optimizer=keras.optimizers.SGD(100.0))
    model.fit(dataset(model, 8), epochs=1, verbose=0)
    assert float(model.logit_scale) <= 100.0 + 1e-3
    with pytest.raises(ValueError, match="logit_scale"):
        tiny_model(logit_scale=200.0)


def test_sigmoid_loss_trains_the_bias():
    model = tiny_model(logit_scale=10.0, logit_bias=-10.0)
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss=kci.losses.SigmoidLoss())
    model.fit(dataset(model, 16), epochs=2, verbose=0)
    assert float(model.logit_bias) != -10.0
    with pytest.raises(ValueError, match="logit_bias"):
        tiny_model().compile(loss=kci.losses.SigmoidLoss())


@pytest.mark.slow
def test_mixed_bfloat16_trains_with_a_float32_loss():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = tiny_model()
        model.compile(optimizer=keras.optimizers.AdamW(1e-3))
        batch = tokenized_batch(model)
        outputs = model(batch)
        assert keras.backend.standardize_dtype(model.image_projection.compute_dtype) == "bfloat16"
        assert keras.backend.standardize_dtype(outputs["image_embeddings"].dtype) == "float32"
        assert keras.backend.standardize_dtype(model.compute_loss(batch, None, outputs).dtype) == "float32"
        history = model.fit(dataset(model, 8), epochs=1, verbose=0).history
        assert np.all(np.isfinite(history["loss"]))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_lock_image_tower_lit():
    model = tiny_model(image="cnn")
    model.lock("image")
    model.lock("image")  # safe to call again
    assert model.locked_towers == {"image": 0}
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    image_before = weights_of(model.image_encoder)  # includes batch-norm moving statistics
    text_before = weights_of(model.text_encoder)
    projection_before = weights_of(model.image_projection)
    model.fit(dataset(model, 16), epochs=1, verbose=0)
    assert not changed(image_before, weights_of(model.image_encoder))
    assert changed(text_before, weights_of(model.text_encoder))
    assert changed(projection_before, weights_of(model.image_projection))
    # Batch norm runs on its moving statistics: training mode gives the inference output.
    images = tokenized_batch(model)["images"]
    np.testing.assert_allclose(
        model.image_encoder(images, training=True), model.image_encoder(images, training=False), atol=1e-5
    )
    model.unlock("image")
    assert model.locked_towers == {}
    model.fit(dataset(model, 16), epochs=1, verbose=0)
    assert changed(image_before, weights_of(model.image_encoder))


@pytest.mark.tf_parity
def test_lock_with_unlocked_groups_trains_only_the_top_blocks():
    model = tiny_model()
    model.lock("image", unlocked_groups=1)  # only the final layer norm of the ViT
    trainable = {id(v) for v in model.trainable_variables}
    backbone = model.image_encoder.backbone
    final_norm = backbone.get_layer("vit_encoder").layer_norm
    assert all(id(v) in trainable for v in final_norm.weights)
    frozen = [v for v in backbone.weights if not any(v is w for w in final_norm.weights)]
    assert frozen and not any(id(v) in trainable for v in frozen)
    model.lock("image", unlocked_groups=2)  # and the last transformer block
    assert len(model.trainable_variables) > len(trainable)
    with pytest.raises(ValueError, match="unlocked_groups"):
        model.lock("image", unlocked_groups=99)
    with pytest.raises(ValueError, match="tower"):
        model.lock("audio")


def test_locking_after_compile_rebuilds_the_optimizer():
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    model.fit(dataset(model, 16), epochs=1, verbose=0)
    model.lock("text")
    text_before = weights_of(model.text_encoder)
    model.fit(dataset(model, 16), epochs=1, verbose=0)
    assert not changed(text_before, weights_of(model.text_encoder))
    model.unlock("text")
    model.fit(dataset(model, 16), epochs=1, verbose=0)
    assert changed(text_before, weights_of(model.text_encoder))


def test_set_learning_rate_replaces_a_schedule_and_training_goes_on():
    model = tiny_model()
    with pytest.raises(ValueError, match="compile"):
        model.set_learning_rate(1e-3)
    model.compile(optimizer=keras.optimizers.AdamW(keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5)))
    model.fit(dataset(model, 16), epochs=1, verbose=0)
    model.set_learning_rate(1e-4)
    heads = weights_of(model.image_projection)
    model.fit(dataset(model, 16), epochs=1, verbose=0)
    assert changed(heads, weights_of(model.image_projection))
    assert math.isclose(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)), 1e-4, rel_tol=1e-6)
    model.set_learning_rate(2e-4)  # a constant rate is assigned
    assert math.isclose(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)), 2e-4, rel_tol=1e-6)


@pytest.mark.tf_parity
def test_encode_accepts_raw_inputs_and_matches_the_model():
    model = tiny_model()
    images, captions = tiny_pairs(5)
    batch = tokenized_batch(model, 5)
    outputs = model(batch)
    np.testing.assert_allclose(model.encode_images(images, batch_size=4), outputs["image_embeddings"], atol=1e-5)
    np.testing.assert_allclose(model.encode_texts(captions, batch_size=2), outputs["text_embeddings"], atol=1e-5)
    larger = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # resized by the tower's preprocessing
    assert model.encode_images(list(larger)).shape == (5, 8)
    assert model.encode_texts("a red cat").shape == (1, 8)
    assert model.encode_texts([]).shape == (0, 8)


@pytest.mark.tf_parity
def test_keras_roundtrip_and_training_resumes(tmp_path):
    model = tiny_model(logit_scale=20.0, learn_logit_scale=False)
    model.lock("image", unlocked_groups=1)
    rebuilt = kci.DualEncoder.from_config(model.get_config())
    assert rebuilt.locked_towers == {"image": 1} and rebuilt.projection_dim == 8
    assert len(rebuilt.trainable_variables) == len(model.trainable_variables)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=kci.losses.ContrastiveLoss(label_smoothing=0.1))
    model.fit(dataset(model, 16), epochs=1, verbose=0)
    images, captions = tiny_pairs(4)
    reloaded = assert_keras_roundtrip(
        model, lambda m: [m.encode_images(images), m.encode_texts(captions)], tmp_path, atol=1e-6
    )
    assert reloaded.locked_towers == {"image": 1}
    assert isinstance(reloaded.contrastive_loss, kci.losses.ContrastiveLoss)
    assert reloaded.contrastive_loss.label_smoothing == 0.1
    assert int(reloaded.optimizer.iterations) == int(model.optimizer.iterations) == 2
    # Same data, same state: one more epoch gives the same weights in the original and the reload.
    model.fit(dataset(model, 16), epochs=1, verbose=0)
    reloaded.fit(dataset(reloaded, 16), epochs=1, verbose=0)
    np.testing.assert_allclose(
        model.encode_texts(captions), reloaded.encode_texts(captions), atol=1e-5
    )


def test_compile_rejects_label_metrics_and_from_preset_explains(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="image_to_text_top1"):
        model.compile(metrics=["accuracy"])
    with pytest.raises(ValueError, match="unknown DualEncoder preset"):
        kci.DualEncoder.from_preset("clip_vit_b32_nonexistent")
    path = str(tmp_path / "model.keras")
    model.save(path)
    assert isinstance(kci.DualEncoder.from_preset(str(tmp_path)), kci.DualEncoder)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "vision-text-dual-encoder"}')
    # A Hugging Face folder is routed to its converter, which names what is missing.
    with pytest.raises(ValueError, match="no model.safetensors or pytorch_model.bin"):
        kci.DualEncoder.from_preset(str(tmp_path / "hf"))
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "siglip"}')
    with pytest.raises(ValueError, match="siglip"):
        kci.DualEncoder.from_preset(str(tmp_path / "hf"))


def test_hf_presets_are_downloaded_first_and_fail_fast_offline(monkeypatch):
    from keras_clip_it.encoders import presets

    monkeypatch.setattr(presets, "_reachable", lambda host, timeout=3.0: False)
    with pytest.raises(ConnectionError, match="offline"):
        kci.DualEncoder.from_preset("hf://clip-italian/clip-italian")
