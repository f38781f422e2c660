"""keras-clip-it plugin: the package's embedded emoji pairs as the collections "emoji-en" and "emoji-it".

The emoji are drawn and named offline by keras-clip-it itself (`kci.datasets.emoji_pairs`), so these two
collections work on any machine with no download: the quickest way to try ASIF end to end. Each pair's
metadata says whether it belongs to the fixed train or test split, so held-out emoji can be left out of
the collection when measuring accuracy.
"""

import keras_clip_it
from keras_clip_it.collections import CollectionSpec
from keras_clip_it.collections import RawPair

LANGUAGES = {"en": "English", "it": "Italian"}


def emoji_pairs(language):
    """Yields the emoji pairs of one language as `RawPair`s (train split first, then test).

    Args:
        language: "en" or "it".

    Example:
    >>> next(iter(emoji_pairs("it"))).metadata["split"]
    'train'
    """
    import keras_clip_it as kci

    for split in ("train", "test"):
        ids, images, captions = kci.datasets.emoji_pairs(lang=language, split=split, return_ids=True)
        for pair_id, image, caption in zip(ids, images, captions):
            yield RawPair(str(pair_id), caption, image, {"split": split})


@keras_clip_it.hookimpl
def register_collections(register):
    for language, name in LANGUAGES.items():
        register(
            CollectionSpec(
                name=f"emoji-{language}",
                language=language,
                pairs=lambda language=language: emoji_pairs(language),
                description=f"Emoji images with their {name} names, embedded in keras-clip-it (no download)",
                source="keras_clip_it.datasets.emoji_pairs: Noto Color Emoji drawings, names from CLDR via `emoji`",
                licence="images Apache-2.0 (noto-emoji, font OFL-1.1); names BSD-3-Clause and Unicode License v3",
            )
        )
