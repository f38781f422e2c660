"""Serving: TF SavedModel export (`export`) and the HTTP server (`create_app`, its `Limits`, `keras-clip-it serve`).

Imported lazily: TensorFlow (export) and FastAPI (server) load only when used.
"""

import importlib

_NAMES = {
    "export": "keras_clip_it.serving.saved_model",
    "create_app": "keras_clip_it.serving.app",
    "Limits": "keras_clip_it.serving.schemas",
}


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'keras_clip_it.serving' has no attribute {name!r}")


def __dir__():
    return sorted(_NAMES)
