"""What several test modules share: config round trip, `.keras` saving and loading in a new process with
identical outputs, and a dense numpy top-k over random unit vectors to check the anchor indexes against."""

import os
import subprocess
import sys

import keras
import numpy as np


def assert_keras_roundtrip(model, run, tmp_path, atol=1e-6, backends=None, imports=()):
    """Saves `model` to .keras here, reloads it in a new process as a user would, and compares `run(model)`.

    The new process runs `import keras_clip_it` and `keras.saving.load_model(path, safe_mode=True)`, nothing
    else, so a class that only the saving process had registered fails here. `run` travels by cloudpickle
    (lambdas and the arrays they close over included); its outputs come back in an .npz.

    Args:
        model: the model to save.
        run: callable(model) -> array (or list of arrays) computed from the model.
        tmp_path: a directory for the file.
        atol: largest absolute difference allowed between the outputs.
        backends: Keras backends of the loading processes; default this process's one.
        imports: modules the new process imports first, as a user imports the module of their own
            custom layers (the package's classes need nothing).

    Returns:
        The model reloaded in this process (for further checks of its attributes).
    """
    expected = _as_list(run(model))
    os.makedirs(str(tmp_path), exist_ok=True)
    path = os.path.join(str(tmp_path), "model.keras")
    model.save(path)
    for backend in backends or (keras.backend.backend(),):
        actual = load_and_run_elsewhere(path, run, tmp_path, backend, type(model).__name__, imports)
        assert len(actual) == len(expected)
        for want, got in zip(expected, actual):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=atol, err_msg=f"reloaded on {backend}")
    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert type(reloaded) is type(model)
    return reloaded


_LOAD_AND_RUN = """
import importlib, pickle, sys
import numpy as np
import keras_clip_it
import keras
for name in sys.argv[5:]:
    importlib.import_module(name)
model = keras.saving.load_model(sys.argv[1], safe_mode=True)
if type(model).__name__ != sys.argv[4]:
    sys.exit(f"loaded a {type(model).__name__}, saved a {sys.argv[4]}")
with open(sys.argv[2], "rb") as handle:
    run = pickle.load(handle)
outputs = run(model)
outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
np.savez(sys.argv[3], *[np.asarray(output) for output in outputs])
"""


def load_and_run_elsewhere(path, run, folder, backend, class_name, imports=()):
    """`run(keras.saving.load_model(path))` in a fresh interpreter on `backend`: the list of its outputs."""
    import cloudpickle

    folder = str(folder)
    function, outputs = os.path.join(folder, "run.pickle"), os.path.join(folder, f"outputs-{backend}.npz")
    with open(function, "wb") as handle:
        cloudpickle.dump(run, handle)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_RUN, path, function, outputs, class_name, *imports],
        capture_output=True, text=True, timeout=600, env=env, cwd=root,
    )
    assert result.returncode == 0, f"loading {path} in a new {backend} process failed:\n{result.stderr[-4000:]}"
    with np.load(outputs) as data:
        return [data[f"arr_{index}"] for index in range(len(data.files))]


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
