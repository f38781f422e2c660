"""The package root is lazy: its light parts import without a backend, its public names on first use.

Each check runs in a fresh interpreter, since this one has long loaded Keras, TensorFlow and JAX.
"""

import os
import subprocess
import sys

import pytest

import keras_clip_it as kci

BACKENDS = ("keras", "tensorflow", "jax")


def run(code, **env):
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def loaded_backends(code):
    """The backend modules in sys.modules after running `code` in a fresh interpreter."""
    script = f"import sys\n{code}\nprint(' '.join(name for name in {BACKENDS!r} if name in sys.modules))"
    return run(script).split()


@pytest.mark.parametrize(
    "code",
    [
        "import keras_clip_it; import keras_clip_it.data.images",
        "import keras_clip_it.templates",
        "import keras_clip_it.cache",
        "import keras_clip_it.data.datasets, keras_clip_it.data.pairs; from keras_clip_it.data import pairs",
        "import keras_clip_it as kci; kci.hookimpl, kci.datasets, kci.data, kci.cache, kci.__version__",
        "import keras_clip_it.collections.storage, keras_clip_it.collections.analogy_collection, "
        "keras_clip_it.collections.registry, keras_clip_it.collections.embedding_cache",
    ],
)
def test_light_parts_load_no_backend(code):
    assert loaded_backends(code) == []


def test_every_public_name_resolves_and_jax_is_the_default_backend():
    env = {key: value for key, value in os.environ.items() if key != "KERAS_BACKEND"}
    code = (
        "import keras_clip_it as kci\n"
        "missing = [name for name in kci.__all__ if getattr(kci, name, None) is None]\n"
        "assert not missing, missing\n"
        "assert set(kci.__all__) <= set(dir(kci))\n"
        "import keras\n"
        "print(keras.backend.backend())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "jax"


def test_names_are_the_objects_of_their_modules():
    from keras_clip_it.collections.hookspecs import hookimpl
    from keras_clip_it.data import datasets
    from keras_clip_it.models.dual_encoder import DualEncoder
    from keras_clip_it.tasks import metrics

    assert kci.DualEncoder is DualEncoder and kci.hookimpl is hookimpl
    assert kci.metrics is metrics and kci.datasets is datasets
    assert kci.encoders.ImageEncoder is kci.ImageEncoder  # subpackages are attributes, as after importing them


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'DualEncoders'"):
        kci.DualEncoders  # noqa: B018


@pytest.mark.parametrize(
    "code",
    [
        "import keras_clip_it; import keras",
        "import keras; import keras_clip_it",
        "import keras_clip_it; import keras_hub",  # keras-hub imports Keras from its own __init__
        "import keras_clip_it.collections; import keras",
        "import keras_clip_it as kci; kci.DualEncoder",  # Keras comes in inside one of our modules
    ],
)
def test_saved_classes_are_known_to_keras_whatever_the_import_order(code):
    names = ["DualEncoder", "ASIF", "ImageEncoder", "TextEncoder", "ContrastiveLoss"]
    script = (
        f"{code}\nimport keras\nknown = keras.saving.get_custom_objects()\n"
        f"print(' '.join(name for name in {names!r} if 'keras_clip_it>' + name not in known))"
    )
    assert run(script).split() == []


def test_a_registration_that_fails_warns_and_never_breaks_import_keras():
    script = (
        "import warnings\nwarnings.simplefilter('always')\n"
        "import keras_clip_it.registration as registration\n"
        "registration.SERIALIZABLE += ('keras_clip_it.no_such_module',)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import keras\n"
        "print(keras.__name__, [str(w.message)[:60] for w in caught if w.category is RuntimeWarning])\n"
    )
    output = run(script)
    assert output.startswith("keras") and "could not register its saved classes" in output
