"""ZeroShotClassifier on a transparent dense model and on a real ASIF over coloured anchors."""

import numpy as np
import pytest

import keras_clip_it as kci
from keras_clip_it.data.images import load_images
from keras_clip_it.templates import fill

COLOURS = ["red", "green", "blue"]


def caption_vector(text):
    """One axis per colour named in the text, plus a template-dependent direction (so templates matter)."""
    vector = np.zeros(4, np.float32)
    for axis, colour in enumerate(COLOURS):
        if colour in text:
            vector[axis] = 1.0
    vector[3] = 0.3 * (len(text) % 5)
    return vector / np.linalg.norm(vector)


def colour_vector(images):
    pixels = load_images(images).astype(np.float32).mean(axis=(1, 2))
    vectors = np.concatenate([pixels, np.zeros((len(pixels), 1), np.float32)], axis=1)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class DenseModel:
    def encode_images(self, images):
        return colour_vector(images)

    def encode_texts(self, texts):
        return np.stack([caption_vector(text) for text in texts])


def solids():
    return np.stack([np.full((8, 8, 3), rgb, np.uint8) for rgb in [(220, 20, 20), (20, 220, 20), (20, 20, 220)]])


def test_mean_ensembling_is_clip_prompt_averaging():
    model = DenseModel()
    classifier = kci.ZeroShotClassifier(model, COLOURS, templates="en-short")
    per_label = np.stack([model.encode_texts(fill("en-short", label)).mean(axis=0) for label in COLOURS])
    per_label /= np.linalg.norm(per_label, axis=1, keepdims=True)
    np.testing.assert_allclose(classifier.scores(solids()), colour_vector(solids()) @ per_label.T, atol=1e-6)
    assert [top[0][0] for top in classifier.predict(solids())] == COLOURS
    assert classifier.accuracy(solids(), COLOURS) == 1.0 and classifier.accuracy(solids(), [0, 1, 2]) == 1.0


def test_max_ensembling_keeps_each_labels_best_caption():
    model = DenseModel()
    classifier = kci.ZeroShotClassifier(model, COLOURS, templates="en-short", aggregate="max")
    captions = [model.encode_texts(fill("en-short", label)) for label in COLOURS]
    expected = np.stack([(colour_vector(solids()) @ c.T).max(axis=1) for c in captions], axis=1)
    np.testing.assert_allclose(classifier.scores(solids()), expected, atol=1e-6)
    top = classifier.predict(solids()[:1], top_k=3)[0]
    assert [label for label, _ in top][0] == "red" and len(top) == 3


class FakeEncoder:
    def __init__(self, embed, name):
        self.embed = embed
        self.fingerprint = name
        self.embedding_dim = 4


def colour_asif():
    rng = np.random.RandomState(0)
    colours = rng.randint(0, 3, 60)
    images = np.stack([np.full((8, 8, 3), 20, np.uint8) for _ in colours])
    for image, colour in zip(images, colours):
        image[..., colour] = rng.randint(150, 255)
    captions = [f"something {COLOURS[c]}" for c in colours]
    image_encoder = FakeEncoder(colour_vector, "colour-image")
    text_encoder = FakeEncoder(lambda texts: np.stack([caption_vector(t) for t in texts]), "colour-text")
    asif = kci.ASIF(image_encoder, text_encoder, k=10, p=2.0)
    asif.add([str(i) for i in range(len(colours))], images=images, captions=captions)
    return asif


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_asif_classification_with_both_ensemblings(aggregate):
    asif = colour_asif()
    classifier = kci.ZeroShotClassifier(asif, COLOURS, templates="en-short", aggregate=aggregate)
    assert [top[0][0] for top in classifier.predict(solids())] == COLOURS
    if aggregate == "mean":  # the same as ASIF's own classify
        np.testing.assert_allclose(classifier.scores(solids()),
                                   asif.classify(solids(), COLOURS, templates="en-short").scores, atol=1e-6)


def test_asif_collection_changes_reach_the_classifier():
    asif = colour_asif()
    classifier = kci.ZeroShotClassifier(asif, COLOURS, templates=None)
    before = classifier.scores(solids())
    asif.remove([str(i) for i in range(30)])
    after = classifier.scores(solids())  # no stale-representation error: the class side is redone
    assert after.shape == before.shape and not np.allclose(after, before)


def test_bad_labels_and_aggregates():
    with pytest.raises(ValueError, match="repeat"):
        kci.ZeroShotClassifier(DenseModel(), ["red", "red"])
    with pytest.raises(ValueError, match="empty"):
        kci.ZeroShotClassifier(DenseModel(), [])
    with pytest.raises(ValueError, match="aggregate"):
        kci.ZeroShotClassifier(DenseModel(), COLOURS, aggregate="median")


def test_evaluate_reports_retrieval_and_zero_shot():
    results = kci.evaluate(DenseModel(), solids(), captions=["a red one", "a green one", "a blue one"],
                           labels=COLOURS, true_labels=COLOURS, templates="en-short")
    assert results["image_to_text_R@1"] == 1.0 and results["text_to_image_R@1"] == 1.0
    assert results["zero_shot_top1"] == 1.0 and "zero_shot_top5" not in results
    several = kci.evaluate(DenseModel(), solids(), captions=["red", "green", "blue", "really red"],
                           image_of_text=[0, 1, 2, 0])
    assert several["text_to_image_R@1"] == 1.0
    with pytest.raises(ValueError, match="true_labels"):
        kci.evaluate(DenseModel(), solids(), labels=COLOURS)
