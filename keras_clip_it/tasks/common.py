"""What every task asks of a model, so DualEncoder and ASIF serve the same tasks.

A model encodes images and texts into representations (dense rows for a DualEncoder, sparse relative
representations for ASIF) and scores pairs of them. `similarity` uses the model's own `similarity`
when it has one and the inner product of dense rows otherwise.
"""

import numpy as np

from keras_clip_it.data.images import as_image_batch


def similarity(model, image_representations, text_representations):
    """(images x texts) float32 scores of two batches of representations."""
    own = getattr(model, "similarity", None)
    if own is not None:
        return np.asarray(own(image_representations, text_representations), np.float32)
    return np.asarray(image_representations, np.float32) @ np.asarray(text_representations, np.float32).T


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def is_text_batch(items):
    """True for texts; False for images in any accepted form.

    Strings are texts unless they name image files (an existing path or a URI ending in an image
    suffix), so "una foto di un gatto" is a caption and "s3://bucket/cat.jpg" an image.
    """
    if isinstance(items, str):
        items = [items]
    if isinstance(items, np.ndarray):
        return items.dtype.kind == "U"
    items = list(items)
    return bool(items) and all(isinstance(item, str) and not _is_image_reference(item) for item in items)


def _is_image_reference(text):
    import os

    named = text.lower().endswith(IMAGE_SUFFIXES)
    return named and ("://" in text or os.path.exists(text))


def as_list(items):
    """A batch as a list (a single string or a single image array becomes a batch of one)."""
    if isinstance(items, str):
        return [items]
    if isinstance(items, np.ndarray) and items.dtype.kind != "U":
        return as_image_batch(items)  # one image, a batch, or a batch of grey images
    return list(items)
