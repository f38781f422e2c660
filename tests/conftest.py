import atexit
import os
import shutil
import tempfile

# Before anything imports keras or TensorFlow: the suite's backend (JAX unless the parity run says
# otherwise) and quiet TF logs.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One XLA compilation cache for the run, in a fresh directory removed at exit (nothing carries over
# between runs), shared with the recipe and multi-device processes the tests start. Many tests build
# the same small models; their programs differ only in layer names, which the cache key leaves out, so
# each distinct training step or inference compiles once instead of once per model.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kci-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
# Programs that compile faster than this are not worth a disk write (eager single operations).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    keras.utils.set_random_seed(0)
    np.random.seed(0)
