"""Discovery through real entry points: the plugin packages in plugins/ and fixture packages on sys.path.

The fixture folder holds two "installed" packages (a module plus a .dist-info folder with its entry
point, exactly what pip leaves in site-packages): one that fails to import, and one that works but also
claims the name "news-it", which the news plugin owns.
"""

import importlib.metadata
import os
import subprocess
import sys

import numpy as np
import pytest

import keras_clip_it as kci
from keras_clip_it.collections.registry import DuplicateCollectionError
from keras_clip_it.collections.registry import PluginWarning
from keras_clip_it.collections.registry import Registry
from keras_clip_it.data.images import load_images

SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "site")
PLUGIN_PACKAGES = {
    "emoji": "keras-clip-it-emoji",
    "fashion": "keras-clip-it-fashion",
    "news": "keras-clip-it-news",
    "films": "keras-clip-it-films",
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_CLIP_IT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KERAS_CLIP_IT_NEWS_CONFIG", raising=False)
    monkeypatch.delenv("KERAS_CLIP_IT_FILMS_MANIFEST", raising=False)


def test_every_plugin_package_is_installed_with_its_entry_point():
    entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group="keras_clip_it")}
    for name, distribution in PLUGIN_PACKAGES.items():
        assert name in entry_points, f"pip install -e plugins/{distribution}"
        assert entry_points[name].dist.name == distribution


def test_the_installed_plugins_register_their_collections(monkeypatch):
    registry = Registry()
    assert {"emoji-en", "emoji-it", "fashion-en", "fashion-it", "news-it"} <= set(registry.available())
    assert registry.broken() == {}
    films = os.path.join(os.path.dirname(__file__), "..", "..", "plugins", "keras-clip-it-films", "tests", "fixtures", "films.csv")
    monkeypatch.setenv("KERAS_CLIP_IT_FILMS_MANIFEST", os.path.abspath(films))
    with pytest.warns(UserWarning, match="without a poster"):
        details = {row["name"]: row for row in registry.available(details=True)}
    assert {"films-it", "films-fr", "films-de"} <= set(details)
    assert details["films-fr"]["plugin"] == "films" and details["news-it"]["plugin"] == "news"


def test_a_broken_package_is_reported_by_name_and_the_others_keep_working(monkeypatch):
    monkeypatch.syspath_prepend(SITE)
    registry = Registry()
    with pytest.warns(PluginWarning) as caught:
        names = registry.available()
    messages = " ".join(str(warning.message) for warning in caught)
    assert "plugin 'fixture-broken' is broken" in messages and "keras_clip_it_fixture_missing_dependency" in messages
    assert {"fixture-squares-it", "emoji-it", "fashion-it"} <= set(names)
    problems = registry.broken()
    assert problems["fixture-broken"].startswith("failed to import (ModuleNotFoundError")
    # The working fixture claims "news-it" too: neither gets it, and the error names both plugins.
    assert "news-it" not in names
    with pytest.raises(DuplicateCollectionError, match="'news-it' is registered by both plugins 'fixture-working' and 'news'"):
        registry.load("news-it")
    squares = registry.load("fixture-squares-it")
    assert squares.captions == ["un quadrato rosso", "un quadrato verde"]
    np.testing.assert_array_equal(load_images(squares.image_refs)[:, 0, 0], [[255, 0, 0], [0, 255, 0]])


def test_cli_lists_collections_and_broken_plugins():
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([SITE, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "keras_clip_it.cli", "collections", "list"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "fixture-squares-it" in result.stdout and "emoji-it" in result.stdout
    assert "broken plugin 'fixture-broken': failed to import" in result.stderr
    assert "broken plugin 'news'" in result.stderr and "broken plugin 'fixture-working'" in result.stderr


def test_cli_info_of_a_registered_collection_and_a_clear_error_for_an_unknown_one(capsys):
    from keras_clip_it import cli

    assert cli.main(["collections", "info", "emoji-it"]) == 0
    out = capsys.readouterr().out
    assert "language        it" in out and "plugin          emoji" in out
    assert cli.main(["collections", "info", "emoji-xx"]) == 1
    assert "no installed plugin registers a collection named 'emoji-xx'" in capsys.readouterr().err
