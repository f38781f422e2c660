"""The registry with plugins registered in-process (pm.register), as plugin authors test theirs."""

import os

import numpy as np
import pytest

import keras_clip_it as kci
from keras_clip_it.collections import CollectionSpec
from keras_clip_it.collections import RawPair
from keras_clip_it.collections.registry import CollectionNotFoundError
from keras_clip_it.collections.registry import DuplicateCollectionError
from keras_clip_it.collections.registry import PluginWarning
from keras_clip_it.collections.registry import Registry
from keras_clip_it.collections.registry import add_pairs
from keras_clip_it.data.images import load_images


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_CLIP_IT_CACHE", str(tmp_path / "cache"))


def _pixels(seed, shape=(5, 7, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


class Shapes:
    """Two collections: one of pixel arrays, one of image files."""

    def __init__(self, folder):
        self.folder = folder

    @kci.hookimpl
    def register_collections(self, register):
        register(
            CollectionSpec(
                "shapes-it",
                "it",
                pairs=lambda: [RawPair(f"s{i}", f"forma {i}", _pixels(i), {"i": i}) for i in range(3)],
                description="three random images",
                source="tests",
                licence="CC0",
            )
        )
        register(CollectionSpec("files-en", "en", pairs=[("f0", "a file", os.path.join(self.folder, "f0.png"))]))


class Exploding:
    @kci.hookimpl
    def register_collections(self, register):
        raise RuntimeError("the plugin's configuration file is missing")


@pytest.fixture
def registry(tmp_path):
    registry = Registry(load_entry_points=False)
    registry.pm.register(Shapes(str(tmp_path)), name="shapes")
    return registry


def test_available_details_and_specs(registry):
    assert registry.available() == ["files-en", "shapes-it"]
    assert registry.available(details=True)[1] == {
        "name": "shapes-it",
        "language": "it",
        "description": "three random images",
        "source": "tests",
        "licence": "CC0",
        "plugin": "shapes",
    }
    assert registry.get_spec("shapes-it").language == "it"
    assert registry.broken() == {}


def test_load_builds_a_collection_whose_array_images_are_cached_losslessly(registry, tmp_path):
    collection = registry.load("shapes-it")
    assert isinstance(collection, kci.collections.AnalogyCollection)
    assert (collection.name, collection.language, len(collection)) == ("shapes-it", "it", 3)
    assert collection.captions == ["forma 0", "forma 1", "forma 2"]
    assert collection.metadata[2] == {"i": 2}
    assert all(ref.startswith(str(tmp_path / "cache")) for ref in collection.image_refs)
    for i, ref in enumerate(collection.image_refs):
        np.testing.assert_array_equal(load_images([ref])[0], _pixels(i))
    # Loading again reuses the files: same content, same names.
    assert registry.load("shapes-it").image_refs == collection.image_refs


def test_a_raising_hook_is_reported_by_name_and_the_others_keep_working(registry):
    registry.pm.register(Exploding(), name="exploding")
    with pytest.warns(PluginWarning, match="plugin 'exploding' is broken.*configuration file is missing"):
        assert registry.available() == ["files-en", "shapes-it"]
    assert registry.broken() == {"exploding": "register_collections raised RuntimeError: the plugin's configuration file is missing"}
    assert len(registry.load("shapes-it")) == 3
    with pytest.raises(CollectionNotFoundError, match=r"'exploding-it'.*available: \['files-en', 'shapes-it'\].*failed.*\['exploding'\]"):
        registry.get_spec("exploding-it")


def test_duplicate_names_are_an_error_naming_both_plugins(registry, tmp_path):
    registry.pm.register(Shapes(str(tmp_path)), name="shapes-copy")
    with pytest.warns(PluginWarning):
        assert registry.available() == []
    with pytest.raises(DuplicateCollectionError, match="'shapes-it' is registered by both plugins 'shapes' and 'shapes-copy'"):
        registry.load("shapes-it")
    assert "'shapes-it' is registered by both" in registry.broken()["shapes-copy"]


def test_register_takes_only_specs(registry):
    class Sloppy:
        @kci.hookimpl
        def register_collections(self, register):
            register({"name": "dict-it"})

    registry.pm.register(Sloppy(), name="sloppy")
    with pytest.warns(PluginWarning):
        registry.available()
    assert "pass a keras_clip_it.collections.CollectionSpec" in registry.broken()["sloppy"]


def test_hooks_run_again_on_every_call_so_unregistering_is_seen(registry):
    plugin = registry.pm.get_plugin("shapes")
    registry.pm.unregister(plugin)
    assert registry.available() == []


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"name": "Films IT"}, ValueError, "collection name 'Films IT' is not valid"),
        ({"name": "s3://bucket/x"}, ValueError, "is not valid"),
        ({"language": ""}, ValueError, "language must be a code"),
        ({"pairs": 3}, TypeError, "pairs must be a function"),
        ({"pairs": (p for p in [])}, TypeError, "one-shot iterator"),
    ],
)
def test_bad_specs_are_clear_errors(kwargs, error, message):
    arguments = dict(name="ok-it", language="it", pairs=[])
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        CollectionSpec(**arguments)


@pytest.mark.parametrize(
    "pair, message",
    [
        (("", "c", "x.png"), "id must be a non-empty string"),
        ((7, "c", "x.png"), "id must be a non-empty string"),
        (("a", "  ", "x.png"), r"\(id 'a'\): caption must be a non-empty string"),
        (("a", "c", np.zeros((2, 2, 2, 2))), "an image array must be numeric"),
        (("a", "c", 3.5), "image must be a path, an fsspec URI or a pixel array"),
        (("a", "c", "x.png", {"when": object()}), "metadata must hold JSON values"),
        (("a", "c"), "expected a RawPair"),
        ({"id": "a", "text": "c", "image": "x.png"}, "needs the keys id, caption, image"),
    ],
)
def test_bad_pairs_name_the_collection_and_the_pair(pair, message):
    spec = CollectionSpec("bad-it", "it", pairs=[pair])
    with pytest.raises((TypeError, ValueError), match=f"collection 'bad-it', pair 0.*{message}"):
        list(spec.iter_pairs())


def test_duplicate_ids_in_a_plugin_are_an_error_naming_them():
    registry = Registry(load_entry_points=False)

    class Repeating:
        @kci.hookimpl
        def register_collections(self, register):
            register(CollectionSpec("twice-en", "en", pairs=[("a", "x", "x.png"), ("a", "y", "y.png")]))

    registry.pm.register(Repeating(), name="repeating")
    with pytest.raises(ValueError, match="repeated: 'a'"):
        registry.load("twice-en")


class Brightness:
    """A small real image encoder: mean brightness per third of the image, L2-normalised."""

    fingerprint = "brightness-v1"

    def embed(self, images, batch_size=32):
        pixels = load_images(images, size=(6, 6)).astype("float32")
        features = np.stack([pixels[:, :, i * 2 : i * 2 + 2].mean(axis=(1, 2, 3)) + 1 for i in range(3)], axis=1)
        return features / np.linalg.norm(features, axis=1, keepdims=True)


def test_add_pairs_embeds_only_new_pairs_with_matching_encoders(registry):
    collection = registry.load("shapes-it")
    encoder = Brightness()
    collection.embed(image_encoder=encoder)
    with pytest.raises(ValueError, match="holds image embeddings from encoder brightness-v.*pass image_encoder="):
        add_pairs(collection, [("new", "nuova forma", _pixels(9))])
    assert len(collection) == 3
    assert add_pairs(collection, [("new", "nuova forma", _pixels(9))], image_encoder=encoder) == ["new"]
    np.testing.assert_allclose(
        collection.embeddings("image", encoder.fingerprint), encoder.embed(collection.image_refs), atol=1e-6
    )
