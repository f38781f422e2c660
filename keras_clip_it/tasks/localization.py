"""Occlusion maps: where in an image a text is found, for any image-text model."""

import numpy as np

from keras_clip_it.data.images import to_rgb_array
from keras_clip_it.tasks.common import similarity


def _positions(size, patch, stride):
    starts = list(range(0, max(size - patch, 0) + 1, stride))
    if starts[-1] != max(size - patch, 0):
        starts.append(size - patch)  # the last row/column of patches reaches the border
    return starts


def localize(model, image, text, patch_fraction=0.25, stride_fraction=0.5, batch_size=32):
    """An (H, W) map of how much each region of `image` supports `text`.

    Slides a patch filled with the image's mean colour over the image and records how much the
    image-text similarity drops; each pixel gets the mean drop of the patches that cover it. Works
    the same for a DualEncoder and for ASIF, since it only asks the model for similarities.

    Args:
        model: a `DualEncoder` or an `ASIF`.
        image: one image (array, PIL image, path or URI).
        text: the text to find, e.g. "uno squalo".
        patch_fraction: patch side as a fraction of the image's shorter side.
        stride_fraction: step between patches as a fraction of the patch side.
        batch_size: occluded copies encoded at once.

    Returns:
        float32 array (H, W) at the image's resolution; positive where hiding the region lowers the
        score, i.e. where the text is.

    Example:
    >>> heatmap = kci.localize(model, skimage.data.chelsea(), "un gatto")  # doctest: +SKIP
    >>> heatmap.shape  # doctest: +SKIP
    (300, 451)
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if not 0 < patch_fraction <= 1 or not 0 < stride_fraction <= 1:
        raise ValueError("patch_fraction and stride_fraction must be in (0, 1]")
    pixels = to_rgb_array(image)
    height, width = pixels.shape[:2]
    patch = max(1, round(min(height, width) * patch_fraction))
    stride = max(1, round(patch * stride_fraction))
    boxes = [(y, x) for y in _positions(height, patch, stride) for x in _positions(width, patch, stride)]
    fill = pixels.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)

    text_representation = model.encode_texts([text])
    base = similarity(model, model.encode_images([pixels]), text_representation)[0, 0]
    drops = np.empty(len(boxes), np.float32)
    for start in range(0, len(boxes), batch_size):
        batch = np.repeat(pixels[None], min(batch_size, len(boxes) - start), axis=0)
        for copy, (y, x) in zip(batch, boxes[start : start + batch_size]):
            copy[y : y + patch, x : x + patch] = fill
        scores = similarity(model, model.encode_images(batch), text_representation)[:, 0]
        drops[start : start + len(batch)] = base - scores

    total = np.zeros((height, width), np.float32)
    count = np.zeros((height, width), np.float32)
    for drop, (y, x) in zip(drops, boxes):
        total[y : y + patch, x : x + patch] += drop
        count[y : y + patch, x : x + patch] += 1
    return total / np.maximum(count, 1)
