"""Figures for the tasks (matplotlib, imported only when a figure is drawn).

Example:
>>> figure = kci.plot.heatmap(image, kci.localize(model, image, "uno squalo"), title="uno squalo")  # doctest: +SKIP
>>> figure.savefig("squalo.png")  # doctest: +SKIP
"""

import numpy as np

from keras_clip_it.data.images import to_rgb_array


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("figures need matplotlib: pip install 'keras-clip-it[demo]'") from None
    return plt


def heatmap(image, values, title=None, ax=None, alpha=0.55, cmap="jet"):
    """Draws a localization map over its image, as the CLIP-Italian demo does.

    Args:
        image: the image (array, PIL image, path or URI).
        values: (H, W) map from `kci.localize`, any scale; negative values are shown as zero.
        title: text above the figure.
        ax: a matplotlib axis to draw on; a new figure when None.
        alpha: opacity of the map.
        cmap: matplotlib colour map.

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    pixels = to_rgb_array(image)
    values = np.asarray(values, np.float32)
    if values.shape != pixels.shape[:2]:
        raise ValueError(f"the map has shape {values.shape} but the image is {pixels.shape[:2]}")
    positive = np.clip(values, 0, None)
    scaled = positive / positive.max() if positive.max() > 0 else positive
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5 * pixels.shape[0] / pixels.shape[1]))
    ax.imshow(pixels)
    ax.imshow(scaled, cmap=cmap, alpha=alpha * scaled, vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax.figure


def image_grid(images, captions, columns=5, title=None, size=2.0):
    """Images in a grid with a caption under each (retrieval results, nearest neighbours).

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    images = list(images)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(to_rgb_array(image))
        ax.set_title(caption, fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def confusion_matrix(true, predicted, class_names, title=None, normalize=True):
    """A confusion matrix of integer labels, rows true classes and columns predictions.

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    count = len(class_names)
    matrix = np.zeros((count, count), np.float64)
    np.add.at(matrix, (np.asarray(true), np.asarray(predicted)), 1)
    if normalize:
        matrix /= np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure, ax = plt.subplots(figsize=(1 + 0.55 * count, 1 + 0.5 * count))
    shown = ax.imshow(matrix, cmap="Blues", vmin=0)
    ax.set_xticks(range(count), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(count), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    figure.colorbar(shown, ax=ax, fraction=0.046)
    if title:
        ax.set_title(title)
    figure.tight_layout()
    return figure
