"""`kci.evaluate`: retrieval metrics and zero-shot accuracy of any image-text model in one call."""

import numpy as np

from keras_clip_it.tasks import metrics
from keras_clip_it.tasks.common import similarity
from keras_clip_it.tasks.zero_shot import ZeroShotClassifier


def evaluate(model, images, captions=None, image_of_text=None, labels=None, true_labels=None,
             templates="en", ks=(1, 5, 10)):
    """Evaluates a DualEncoder or an ASIF on held-out images.

    Args:
        model: a `DualEncoder` or an `ASIF`.
        images: the evaluation images.
        captions: texts describing the images, for retrieval metrics both ways.
        image_of_text: int per caption, the image it describes (default: caption i describes image i);
            an image may have several captions.
        labels: class names, for zero-shot accuracy.
        true_labels: the right class of each image (names or indices into `labels`).
        templates: prompt templates for the class names ("en", "it", ...).
        ks: cut-offs of the retrieval metrics.

    Returns:
        dict of metric name -> float: "image_to_text_R@1", ..., "zero_shot_top1", "zero_shot_top5".

    Example:
    >>> kci.evaluate(asif, images, captions)["image_to_text_R@1"]  # doctest: +SKIP
    0.41
    """
    if captions is None and labels is None:
        raise ValueError("evaluate needs captions (retrieval metrics), labels and true_labels (zero-shot), or both")
    results = {}
    if captions is not None:
        captions = list(captions)
        image_of_text = np.arange(len(captions)) if image_of_text is None else np.asarray(image_of_text)
        scores = similarity(model, model.encode_images(images), model.encode_texts(captions))
        results.update(metrics.retrieval_metrics(scores, image_of_text, ks))
    if labels is not None:
        if true_labels is None:
            raise ValueError("zero-shot accuracy needs true_labels with labels")
        classifier = ZeroShotClassifier(model, labels, templates=templates)
        results["zero_shot_top1"] = classifier.accuracy(images, true_labels, top_k=1)
        if len(classifier.labels) > 5:
            results["zero_shot_top5"] = classifier.accuracy(images, true_labels, top_k=5)
    return results
