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


def _shares_suite_fixtures(item):
    """Whether `item` uses a module- or session-scoped fixture of this suite (a loaded model, a server)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return True
    return any(
        definitions[-1].scope != "function" and definitions[-1].baseid  # baseid "": pytest's own fixtures
        for definitions in info.name2fixturedefs.values()
    )


def pytest_collection_modifyitems(config, items):
    """Slow tests that share no fixture start first.

    scripts/test.sh runs the suite on two pytest-xdist workers, which take whole test modules in
    collection order: a module with a multi-minute test (a recipe, a multi-device run) left at the end
    keeps one worker busy while the other has nothing to do. Tests that share a module- or
    session-scoped fixture keep their place, so a serial run still builds that fixture once.
    """
    first = [item for item in items if item.get_closest_marker("slow") and not _shares_suite_fixtures(item)]
    if first:
        chosen = set(map(id, first))
        items[:] = first + [item for item in items if id(item) not in chosen]
