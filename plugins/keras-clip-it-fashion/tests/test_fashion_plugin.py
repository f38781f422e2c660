import itertools

import numpy as np
import pytest

import keras_clip_it as kci
from keras_clip_it.collections import CollectionSpec
from keras_clip_it.collections.registry import build_collection
from keras_clip_it.data.images import load_images
from keras_clip_it_fashion import fashion_pairs


def test_the_installed_plugin_registers_both_languages():
    details = {row["name"]: row for row in kci.collections.available(details=True)}
    assert details["fashion-it"]["language"] == "it" and details["fashion-en"]["licence"] == "MIT"
    assert details["fashion-it"]["plugin"] == "fashion"


@pytest.mark.parametrize("language", ["en", "it"])
def test_pairs_are_training_images_captioned_with_class_names(language):
    (images, labels), class_names = kci.datasets.fashion_mnist("train", lang=language)
    pairs = list(itertools.islice(fashion_pairs(language), 500))
    assert [pair.id for pair in pairs[:2]] == ["train-00000", "train-00001"]
    assert [pair.caption for pair in pairs] == [class_names[int(y)] for y in labels[:500]]
    assert [pair.metadata["label"] for pair in pairs] == [int(y) for y in labels[:500]]
    np.testing.assert_array_equal(pairs[7].image, images[7])


def test_english_and_italian_captions_differ_for_the_same_images():
    english, italian = (list(itertools.islice(fashion_pairs(language), 50)) for language in ("en", "it"))
    assert [pair.id for pair in english] == [pair.id for pair in italian]
    assert any(e.caption != i.caption for e, i in zip(english, italian))


def test_a_collection_built_from_the_pairs_reads_back_the_same_pixels():
    spec = CollectionSpec("fashion-it-sample", "it", pairs=lambda: itertools.islice(fashion_pairs("it"), 200))
    collection = build_collection(spec)
    (images, _), _ = kci.datasets.fashion_mnist("train", lang="it")
    np.testing.assert_array_equal(load_images(collection.image_refs)[..., 0], images[:200])


@pytest.mark.slow
def test_the_whole_collection_loads():
    collection = kci.collections.load("fashion-it")
    assert len(collection) == 60_000 and collection.ids[-1] == "train-59999"
