"""`keras-clip-it collections build|info|add|remove|compact` on a stored collection, in process."""

import json
import os

import numpy as np
import pytest

import keras_clip_it as kci
from keras_clip_it import cli
from keras_clip_it.collections import storage
from keras_clip_it.data.images import load_images

FILMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "plugins", "keras-clip-it-films", "tests", "fixtures")


@pytest.fixture(autouse=True)
def _films_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_CLIP_IT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KERAS_CLIP_IT_FILMS_MANIFEST", os.path.abspath(os.path.join(FILMS, "films.csv")))


# The fixture manifest has one film without a poster, skipped with a warning each time it is read.
pytestmark = pytest.mark.filterwarnings("ignore:manifest .* without a poster")


def _run(capsys, *argv):
    status = cli.main(["collections", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_build_add_remove_compact(tmp_path, capsys):
    uri = f"file://{tmp_path}/films-it"
    status, out, _ = _run(capsys, "build", "films-it", "--to", uri)
    assert status == 0 and "built 'films-it': 3 pairs" in out
    status, out, _ = _run(capsys, "info", uri)
    assert status == 0 and "'pairs': 3" in out and "language        it" in out

    new = tmp_path / "new.jsonl"
    poster = os.path.abspath(os.path.join(FILMS, "posters", "metropolis.png"))
    new.write_text(json.dumps({"id": "roma-1972", "caption": "Roma (1972)", "image": poster, "metadata": {"year": 1972}}) + "\n")
    assert _run(capsys, "add", uri, "--pairs", str(new))[1].startswith("added 1 pairs")
    assert _run(capsys, "add", uri, "--from", "films-it")[1].startswith("added 0 pairs")  # all present already
    collection = storage.open_collection(uri)
    assert collection.ids[-1] == "roma-1972" and collection.metadata[-1] == {"year": 1972}

    status, _, err = _run(capsys, "remove", uri, "roma-1972", "no-such-film")
    assert status == 1 and "has no pairs with ids 'no-such-film'" in err and not err.count('"')
    assert _run(capsys, "remove", uri, "it-la-dolce-vita-1960")[1].startswith("removed 1 pairs")
    status, out, _ = _run(capsys, "compact", uri)
    assert status == 0 and "3 pairs in 1 segment(s)" in out
    assert storage.open_collection(uri).ids == ["it-ladri-di-biciclette-1948", "it-8-1963", "roma-1972"]


class MeanColour:
    """A small real image encoder: the mean RGB colour, L2-normalised."""

    fingerprint = "mean-colour-v1"

    def embed(self, images, batch_size=32):
        colour = load_images(images, size=(8, 8)).reshape(len(images), -1, 3).mean(axis=1) + 1.0
        return (colour / np.linalg.norm(colour, axis=1, keepdims=True)).astype("float32")


def test_adding_to_an_embedded_collection_without_its_encoder_changes_nothing(tmp_path, capsys):
    uri = str(tmp_path / "films-fr")
    collection = kci.collections.load("films-fr")
    collection.embed(image_encoder=MeanColour())
    storage.save_collection(collection, uri)
    new = tmp_path / "new.jsonl"
    new.write_text('{"id": "x", "caption": "Playtime (1967)", "image": "%s"}\n' % os.path.join(FILMS, "posters", "amelie.png"))
    status, _, err = _run(capsys, "add", uri, "--pairs", str(new))
    assert status == 1 and "holds image embeddings from encoder mean-colour-" in err
    assert storage.info(uri)["counts"]["pairs"] == 2


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "caption": "c", "image": "p.png"}\n{"id": \n')
    uri = str(tmp_path / "films-it")
    _run(capsys, "build", "films-it", "--to", uri)
    status, _, err = _run(capsys, "add", uri, "--pairs", str(bad))
    assert status == 1 and f"{bad}, line 2: not a JSON object" in err
    status, _, err = _run(capsys, "info", str(tmp_path / "nothing-here"))
    assert status == 1 and "error:" in err
