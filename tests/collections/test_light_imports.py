"""The collections layer imports without keras, TensorFlow or JAX (a plugin or a storage tool needs none)."""

import subprocess
import sys

import pytest


@pytest.mark.xfail(
    strict=False,
    reason="needs the lazy package root (PEP 562 keras_clip_it/__init__.py, issue #24 root room): until then "
    "importing any keras_clip_it submodule runs the root's eager imports of keras",
)
def test_collections_modules_import_without_keras_tensorflow_or_jax():
    modules = ["storage", "analogy_collection", "registry", "embedding_cache"]
    code = (
        "import sys\n"
        + "".join(f"import keras_clip_it.collections.{name}\n" for name in modules)
        + "print(' '.join(sorted(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules)))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []
