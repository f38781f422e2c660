"""keras-clip-it plugin: Fashion-MNIST training images as the collections "fashion-en" and "fashion-it".

A domain set: small grey product photos whose captions are the class names in English or Italian. It
shows what ASIF is for, turning generic encoders into a classifier for a new domain by swapping in a
collection, with no training. The test split stays out of the collection so it can measure that.
"""

import keras_clip_it
from keras_clip_it.collections import CollectionSpec
from keras_clip_it.collections import RawPair

LANGUAGES = {"en": "English", "it": "Italian"}


def fashion_pairs(language):
    """Yields the 60,000 Fashion-MNIST training images with their class names in `language`.

    Args:
        language: "en" or "it".

    Example:
    >>> next(iter(fashion_pairs("it"))).id
    'train-00000'
    """
    import keras_clip_it as kci

    (images, labels), class_names = kci.datasets.fashion_mnist("train", lang=language)
    for index, (image, label) in enumerate(zip(images, labels)):
        label = int(label)
        yield RawPair(f"train-{index:05d}", class_names[label], image, {"label": label})


@keras_clip_it.hookimpl
def register_collections(register):
    for language, name in LANGUAGES.items():
        register(
            CollectionSpec(
                name=f"fashion-{language}",
                language=language,
                pairs=lambda language=language: fashion_pairs(language),
                description=f"Fashion-MNIST training images (60,000) captioned with {name} class names",
                source="Fashion-MNIST, Zalando Research (https://github.com/zalandoresearch/fashion-mnist)",
                licence="MIT",
            )
        )
