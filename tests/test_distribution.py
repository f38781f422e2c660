"""Where training runs: one device by default, every local device with "data-parallel"."""

import os
import subprocess
import sys

import pytest

from keras_clip_it.distribution import Distribution

# In a fresh process: the host CPU split in two before JAX starts, then a data-parallel distribution.
DATA_PARALLEL = """
from keras_clip_it.distribution import Distribution, split_host_cpu
split_host_cpu(2)
import keras
distribution = Distribution("data-parallel")
assert isinstance(keras.distribution.distribution(), keras.distribution.DataParallel)
with distribution.scope():
    pass
print(distribution.describe())
"""


def test_none_is_one_device_and_no_strategy():
    distribution = Distribution()
    assert distribution.devices == 1 and distribution.strategy is None
    assert distribution.describe() == "none (1 device)"
    with distribution.scope():
        pass


def test_unknown_kind_names_the_choices():
    with pytest.raises(ValueError, match="'none', 'data-parallel', 'tpu'"):
        Distribution("gpus")


def test_data_parallel_over_a_split_host_cpu_on_jax():
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["KERAS_BACKEND"] = "jax"
    result = subprocess.run([sys.executable, "-c", DATA_PARALLEL], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "data-parallel (2 devices)"


def test_tpu_without_a_tpu_is_a_clear_error():
    import keras

    if keras.backend.backend() != "jax":
        pytest.skip("the TensorFlow path would try to reach a TPU cluster")
    with pytest.raises(RuntimeError, match="JAX sees no TPU"):
        Distribution("tpu")
