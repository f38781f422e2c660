"""The minimal plugin in docs/collections.md, copied out of the page, pip-installed and loaded."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from keras_clip_it.collections.registry import Registry
from keras_clip_it.data.images import load_images

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "collections.md")


def _files_on_the_page():
    """The fenced blocks tagged `file=NAME`, as {NAME: text}."""
    with open(DOCS, encoding="utf-8") as handle:
        page = handle.read()
    return dict(re.findall(r"```\w+ file=(\S+)\n(.*?)```", page, flags=re.S))


@pytest.mark.slow
def test_the_documented_plugin_installs_and_serves_its_collection(tmp_path, monkeypatch):
    files = _files_on_the_page()
    assert sorted(files) == ["keras_clip_it_myphotos.py", "pyproject.toml"]
    package = tmp_path / "keras-clip-it-myphotos"
    package.mkdir()
    for name, text in files.items():
        (package / name).write_text(text)
    site = tmp_path / "site"
    # A real install (wheel build, .dist-info with the entry point) into a private folder, offline.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(package)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    photos = tmp_path / "vacanze"
    photos.mkdir()
    colours = {"mare.png": (20, 90, 200), "bosco.png": (30, 140, 40)}
    for name, colour in colours.items():
        Image.new("RGB", (12, 9), colour).save(photos / name)
    (photos / "captions.csv").write_text("file,caption\nmare.png,il mare d'estate\nbosco.png,un bosco in montagna\n")
    monkeypatch.setenv("MY_PHOTOS", str(photos))
    monkeypatch.syspath_prepend(str(site))

    registry = Registry()
    assert "my-photos-it" in registry.available()
    assert registry.details("my-photos-it")["plugin"] == "myphotos"
    collection = registry.load("my-photos-it")
    assert collection.ids == ["mare.png", "bosco.png"]
    assert collection.captions == ["il mare d'estate", "un bosco in montagna"]
    np.testing.assert_array_equal(load_images(collection.image_refs)[:, 0, 0], list(colours.values()))


def test_the_documented_in_process_test_snippet_works(tmp_path, monkeypatch):
    files = _files_on_the_page()
    (tmp_path / "keras_clip_it_myphotos.py").write_text(files["keras_clip_it_myphotos.py"])
    monkeypatch.syspath_prepend(str(tmp_path))
    with open(DOCS, encoding="utf-8") as handle:
        snippet = re.search(r"  ```python\n(  from keras_clip_it.collections.registry.*?)  ```", handle.read(), re.S).group(1)
    exec(compile("\n".join(line[2:] for line in snippet.splitlines()), "docs/collections.md", "exec"), {})
    sys.modules.pop("keras_clip_it_myphotos", None)
