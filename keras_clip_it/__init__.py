"""keras-clip-it: image-text models in Keras 3, with Italian as a first-class language.

JAX is the default backend: set ``KERAS_BACKEND`` before importing to choose another.

The public names are imported on first use (PEP 562), so `import keras_clip_it.collections` or
`keras_clip_it.data` loads neither Keras nor TensorFlow nor JAX: a plugin, a storage tool or a data
pipeline pays for a backend only when it touches a model. The package's saved classes are registered
with Keras as soon as Keras is imported (`keras_clip_it.registration`), so after `import keras_clip_it`,
`keras.saving.load_model` reads a saved `DualEncoder`, `ASIF` or encoder in any process.
"""

import importlib
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

from keras_clip_it import registration  # noqa: E402
from keras_clip_it.version import __version__  # noqa: E402

# Public name -> (module, attribute in it; None for the module itself).
_PUBLIC = {
    "ImageEncoder": ("keras_clip_it.encoders", "ImageEncoder"),
    "TextEncoder": ("keras_clip_it.encoders", "TextEncoder"),
    "DualEncoder": ("keras_clip_it.models.dual_encoder", "DualEncoder"),
    "ASIF": ("keras_clip_it.models.asif", "ASIF"),
    "ZeroShotClassifier": ("keras_clip_it.tasks.zero_shot", "ZeroShotClassifier"),
    "retrieve": ("keras_clip_it.tasks.retrieval", "retrieve"),
    "localize": ("keras_clip_it.tasks.localization", "localize"),
    "evaluate": ("keras_clip_it.tasks.evaluate", "evaluate"),
    "metrics": ("keras_clip_it.tasks.metrics", None),
    "plot": ("keras_clip_it.tasks.plot", None),
    "datasets": ("keras_clip_it.data.datasets", None),
    "hookimpl": ("keras_clip_it.collections.hookspecs", "hookimpl"),
    **{
        name: (f"keras_clip_it.{name}", None)
        for name in ("cache", "callbacks", "collections", "data", "distribution", "losses", "serving")
    },
}
# Subpackages reachable as attributes too (`kci.encoders.presets`), as after any import of them.
_SUBPACKAGES = ("encoders", "models", "search", "tasks", "templates")

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name):
    if name in _PUBLIC:
        module_name, attribute = _PUBLIC[name]
    elif name in _SUBPACKAGES:
        module_name, attribute = f"keras_clip_it.{name}", None
    else:
        raise AttributeError(f"module 'keras_clip_it' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    registration.register()  # this import may have been the one that brought Keras in
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted({*globals(), *_PUBLIC, *_SUBPACKAGES})


registration.install()
