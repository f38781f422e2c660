"""Zero-shot classification with prompt templates, for DualEncoder and ASIF alike."""

import numpy as np

from keras_clip_it.tasks.common import similarity
from keras_clip_it.templates import ensemble
from keras_clip_it.templates import fill
from keras_clip_it.templates import get_templates

AGGREGATES = ("mean", "max")


class ZeroShotClassifier:
    """Classifies images among labels the model was never trained on, from their names.

    Each label becomes captions through the templates ("una foto di {}.") and the templates are
    ensembled: "mean" averages the captions' normalised text embeddings and re-normalises (CLIP's
    prompt ensembling; for ASIF the averaged embedding is then represented against the collection),
    "max" scores every caption and keeps each label's best. By default (None) a DualEncoder averages
    and an ASIF pools as its `label_pooling` says (and its server and export do). Class
    representations are computed once, in batches, when the classifier is built.

    Args:
        model: a `DualEncoder` or an `ASIF`.
        labels: class names, as they would be said ("un gatto", "cane").
        templates: "en", "en-short", "it", "it-short", a template string with "{}", a callable, a
            list of those, or None (labels used as they are).
        aggregate: None (the model's own way), "mean" or "max" over templates.

    Example:
    >>> clf = kci.ZeroShotClassifier(asif, ["gatto", "cane"], templates="it")  # doctest: +SKIP
    >>> clf.predict(images, top_k=1)[0]  # doctest: +SKIP
    [('gatto', 0.42)]
    """

    def __init__(self, model, labels, templates="en", aggregate=None):
        if aggregate is not None and aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        labels = [labels] if isinstance(labels, str) else list(labels)
        if not labels:
            raise ValueError("labels is empty: give at least one class name")
        if len(set(labels)) != len(labels):
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            raise ValueError(f"labels repeat: {repeated}")
        self.model = model
        self.labels = labels
        self.templates = templates
        self.aggregate = aggregate
        self._template_count = len(get_templates(templates))
        self.class_representations = self._class_representations()

    @property
    def _pooling(self):
        """ASIF's label pooling for this classifier's aggregate (None: the model's own)."""
        return {None: None, "mean": "average", "max": "max"}[self.aggregate]

    def _class_representations(self):
        if hasattr(self.model, "class_scores"):  # ASIF: pooled on its state, as its server and export do
            return self.model.snapshot().class_representations(self.labels, self.templates, pooling=self._pooling)
        if self.aggregate in (None, "mean"):
            return ensemble(self.model.encode_texts, self.labels, self.templates)
        return self.model.encode_texts([caption for label in self.labels for caption in fill(self.templates, label)])

    def scores(self, images):
        """(images, labels) float32 scores; higher means more likely."""
        return self.scores_of(self.model.encode_images(images))

    def scores_of(self, image_representations):
        """(images, labels) float32 scores of image representations (`model.encode_images`)."""
        if hasattr(self.model, "class_scores"):
            self.class_representations = self._class_representations()  # kept on the model's state
            return self.model.class_scores(image_representations, self.labels, self.templates, pooling=self._pooling)
        scores = similarity(self.model, image_representations, self.class_representations)
        if self.aggregate == "max":
            scores = scores.reshape(len(scores), len(self.labels), self._template_count).max(axis=2)
        return scores

    def predict(self, images, top_k=1):
        """The `top_k` (label, score) pairs of each image, best first."""
        scores = self.scores(images)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
        return [[(self.labels[j], float(row[j])) for j in order] for row, order in zip(scores, best)]

    def accuracy(self, images, true_labels, top_k=1):
        """Fraction of images whose true label (a name or an index into `labels`) is among the top `k`."""
        truth = np.asarray([self.labels.index(t) if isinstance(t, str) else int(t) for t in true_labels])
        scores = self.scores(images)
        if len(truth) != len(scores):
            raise ValueError(f"{len(truth)} true labels for {len(scores)} images")
        best = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
        return float(np.mean((best == truth[:, None]).any(axis=1)))
