import numpy as np

import keras_clip_it as kci
from keras_clip_it.data.images import load_images
from keras_clip_it_emoji import emoji_pairs


def test_the_installed_plugin_registers_both_languages():
    details = {row["name"]: row for row in kci.collections.available(details=True)}
    assert details["emoji-en"]["language"] == "en" and details["emoji-it"]["language"] == "it"
    assert details["emoji-it"]["plugin"] == "emoji"


def test_pairs_are_the_embedded_dataset_with_its_split():
    train_ids, train_images, train_captions = kci.datasets.emoji_pairs("it", split="train", return_ids=True)
    test_ids, _, test_captions = kci.datasets.emoji_pairs("it", split="test", return_ids=True)
    pairs = list(emoji_pairs("it"))
    assert [pair.id for pair in pairs] == [str(i) for i in list(train_ids) + list(test_ids)]
    assert [pair.caption for pair in pairs] == list(train_captions) + list(test_captions)
    assert [pair.metadata["split"] for pair in pairs] == ["train"] * len(train_ids) + ["test"] * len(test_ids)
    np.testing.assert_array_equal(pairs[0].image, train_images[0])
    english = list(emoji_pairs("en"))
    assert [pair.id for pair in english] == [pair.id for pair in pairs]  # same emoji, other language
    assert english[0].caption != pairs[0].caption


def test_load_gives_the_whole_collection_with_lossless_image_files():
    ids, images, captions = kci.datasets.emoji_pairs("it", split="all", return_ids=True)
    collection = kci.collections.load("emoji-it")
    assert (collection.name, collection.language, len(collection)) == ("emoji-it", "it", len(ids))
    assert sorted(collection.ids) == sorted(str(i) for i in ids)
    by_id = dict(zip(collection.ids, collection.image_refs))
    sample = np.random.default_rng(0).choice(len(ids), 25, replace=False)
    decoded = load_images([by_id[str(ids[i])] for i in sample])
    np.testing.assert_array_equal(decoded, load_images(images[sample]))
