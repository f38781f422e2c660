import os

# Before anything imports keras or TensorFlow: the suite's backend (JAX unless the parity run says
# otherwise) and quiet TF logs.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    keras.utils.set_random_seed(0)
    np.random.seed(0)
