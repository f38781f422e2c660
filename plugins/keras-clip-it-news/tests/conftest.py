import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Downloads and converted images go to a fresh folder, never the user's cache."""
    monkeypatch.setenv("KERAS_CLIP_IT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KERAS_CLIP_IT_NEWS_CONFIG", raising=False)


@pytest.fixture
def fixture_path():
    return lambda name: os.path.join(FIXTURES, name)
