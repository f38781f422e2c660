import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Images written by a load go to a fresh folder, never the user's cache."""
    monkeypatch.setenv("KERAS_CLIP_IT_CACHE", str(tmp_path / "cache"))
