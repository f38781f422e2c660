"""What several test modules share: config round trip, `.keras` saving with identical outputs, and a
dense numpy top-k over random unit vectors to check the anchor indexes against."""

import os

import keras
import numpy as np


def assert_keras_roundtrip(model, run, tmp_path, atol=1e-6):
    """Saves `model` to .keras, reloads it with safe_mode and no custom_objects, and compares `run(model)`.

    Args:
        model: the model to save.
        run: callable(model) -> array (or list of arrays) computed from the model.
        tmp_path: a directory for the file.
        atol: largest absolute difference allowed between the outputs.

    Returns:
        The reloaded model.
    """
    expected = run(model)
    os.makedirs(str(tmp_path), exist_ok=True)
    path = os.path.join(str(tmp_path), "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert type(reloaded) is type(model)
    actual = run(reloaded)
    for want, got in zip(_as_list(expected), _as_list(actual)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=atol)
    return reloaded


def assert_config_roundtrip(model):
    """`from_config(get_config())` rebuilds a model with the same config."""
    config = model.get_config()
    rebuilt = type(model).from_config(config)
    assert rebuilt.get_config() == config
    return rebuilt


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def unit(x):
    """Rows of `x` scaled to unit length, float32."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def dense_topk(queries, anchors, k):
    """The k largest inner products of each query with the anchors, by a full product: (values, rows)."""
    scores = queries @ anchors.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows
