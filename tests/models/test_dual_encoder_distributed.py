"""One training step on 4 simulated CPU devices equals the same step on one device, on JAX and TensorFlow.

Each backend runs in its own Python process: JAX reads the device count from XLA_FLAGS when it is
imported, and TensorFlow's logical devices must be configured before it starts. The process trains a
tiny dual encoder for one SGD step on one global batch of 16 pairs, once on a single device and once
split over 4 devices, from the same weights, and prints what the parent test compares. SGD rather than
Adam: Adam's first step divides the gradient by its own magnitude and would hide a gradient that is off
by a constant factor (such as a missing 1 / num_replicas).
"""

import functools
import json
import os
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICES = 4
BATCH = 16
LOSSES = ("contrastive", "sigmoid")


def _many_device_scope(backend):
    """Sets up the 4-device run of `backend` and returns the scope to build and compile the model in."""
    if backend == "jax":
        import jax
        import keras

        assert jax.device_count() == DEVICES, jax.devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
        return nullcontext()
    return _mirrored_strategy().scope()


@functools.lru_cache(maxsize=None)
def _mirrored_strategy():
    """One strategy per process, as in a real program: TensorFlow's runtime remembers each collective
    by its keys, and a second strategy would hand out the same keys again for other operations."""
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy([f"/cpu:{index}" for index in range(DEVICES)])
    assert strategy.num_replicas_in_sync == DEVICES
    return strategy


def _one_step(loss_name, weights, batch, backend, distributed):
    """Loss and weights after one SGD step from `weights` on `batch`, on one device or on DEVICES."""
    import keras
    import tensorflow as tf

    import keras_clip_it as kci
    from tests.models.test_dual_encoder_towers import tiny_model

    keras.utils.set_random_seed(0)
    with _many_device_scope(backend) if distributed else nullcontext():
        model = tiny_model(logit_scale=10.0, logit_bias=-5.0 if loss_name == "sigmoid" else None)
        model.set_weights(weights)
        loss = kci.losses.SigmoidLoss() if loss_name == "sigmoid" else kci.losses.ContrastiveLoss()
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    data = tf.data.Dataset.from_tensor_slices(batch).batch(BATCH)
    history = model.fit(data, epochs=1, verbose=0).history
    if backend == "jax":
        sharded_over = len(model.image_projection.kernel.value.sharding.device_set)
        keras.distribution.set_distribution(None)
    else:
        sharded_over = model.distribute_strategy.num_replicas_in_sync
    top1 = [history[name][0] for name in ("image_to_text_top1", "text_to_image_top1")]
    return float(history["loss"][0]), top1, [np.asarray(w) for w in model.get_weights()], sharded_over


def _local_only_loss(loss_name, weights, batch):
    """The loss a many-device run would report if each device scored its rows only against its own slice."""
    import keras_clip_it as kci
    from tests.models.test_dual_encoder_towers import tiny_model

    model = tiny_model(logit_scale=10.0, logit_bias=-5.0 if loss_name == "sigmoid" else None)
    model.set_weights(weights)
    loss = kci.losses.SigmoidLoss() if loss_name == "sigmoid" else kci.losses.ContrastiveLoss()
    model.compile(optimizer="sgd", loss=loss)
    outputs = model(batch)
    size = BATCH // DEVICES
    total = 0.0
    for start in range(0, BATCH, size):
        part = {key: value[start:start + size] for key, value in outputs.items()}
        total += float(model.compute_loss(None, None, part)) / DEVICES
    return total


def compare_one_step(backend, losses=LOSSES):
    """Runs in a fresh process: one step on one device and on DEVICES, for both losses; prints JSON."""
    if backend == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * DEVICES)
    from tests.models.test_dual_encoder_towers import tiny_model
    from tests.models.test_dual_encoder_towers import tokenized_batch

    report = {}
    for loss_name in losses:
        start = tiny_model(logit_scale=10.0, logit_bias=-5.0 if loss_name == "sigmoid" else None)
        weights = start.get_weights()
        batch = tokenized_batch(start, BATCH, seed=1)
        one_loss, one_top1, one_weights, _ = _one_step(loss_name, weights, batch, backend, distributed=False)
        many_loss, many_top1, many_weights, sharded_over = _one_step(loss_name, weights, batch, backend, True)
        report[loss_name] = {
            "one_device_loss": one_loss,
            "many_device_loss": many_loss,
            "one_device_top1": one_top1,
            "many_device_top1": many_top1,
            "local_only_loss": _local_only_loss(loss_name, weights, batch),
            "largest_update": max(float(np.abs(a - w).max()) for a, w in zip(one_weights, weights)),
            "largest_difference": max(float(np.abs(a - b).max()) for a, b in zip(one_weights, many_weights)),
            "variables_on_devices": sharded_over,
        }
    print("RESULT " + json.dumps(report))


def run_in_process(backend):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    if backend == "jax":
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}".strip()
    code = f"from tests.models.test_dual_encoder_distributed import compare_one_step; compare_one_step({backend!r})"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_many_devices_match_one_device(backend):
    report = run_in_process(backend)
    for loss_name in LOSSES:
        figures = report[loss_name]
        assert figures["variables_on_devices"] == DEVICES, figures
        # The loss sees the global batch: equal to one device, and not the average of per-device losses.
        np.testing.assert_allclose(figures["many_device_loss"], figures["one_device_loss"], rtol=1e-5)
        assert abs(figures["local_only_loss"] - figures["one_device_loss"]) > 0.05, figures
        # In-batch top-1 also ranks each query against the global batch.
        np.testing.assert_allclose(figures["many_device_top1"], figures["one_device_top1"], atol=1e-6)
        # The step moves the weights (the sigmoid bias by ~1): both setups land on the same weights.
        assert figures["largest_update"] > 1e-2, figures
        assert figures["largest_difference"] < 1e-5, figures
