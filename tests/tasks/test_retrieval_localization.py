"""Retrieval and localization mechanics on a transparent model: images are embedded by their mean
colour and the texts "red", "green", "blue" by the matching axis, so every right answer is known."""

import numpy as np
import pytest

import keras_clip_it as kci
from keras_clip_it.data.images import load_images
from keras_clip_it.tasks import localization
from keras_clip_it.tasks import retrieval

COLOURS = {"red": 0, "green": 1, "blue": 2}


class ColourModel:
    def __init__(self):
        self.calls = []

    def encode_images(self, images):
        pixels = load_images(images).astype(np.float32).mean(axis=(1, 2))
        self.calls.append(len(pixels))
        return pixels / np.linalg.norm(pixels, axis=1, keepdims=True)

    def encode_texts(self, texts):
        return np.eye(3, dtype=np.float32)[[COLOURS[text] for text in texts]]


def solid(rgb, size=8):
    return np.full((size, size, 3), rgb, np.uint8)


def test_text_to_image_and_back_with_a_chunked_gallery():
    gallery = [solid((200, 10, 10)), solid((10, 200, 10)), solid((10, 10, 200)), solid((150, 90, 10))]
    model = ColourModel()
    result = kci.retrieve(model, ["green", "red"], gallery, top_k=2, chunk_size=3)
    assert result.indices.tolist() == [[1, 3], [0, 3]]
    assert model.calls == [3, 1]  # the gallery went through in chunks
    assert result[0][0][0] == 1 and result.scores.dtype == np.float32
    back = kci.retrieve(model, gallery[:3], ["red", "green", "blue"], top_k=1)
    assert back.indices[:, 0].tolist() == [0, 1, 2]


def test_top_k_larger_than_the_gallery_and_bad_calls():
    model = ColourModel()
    assert kci.retrieve(model, "blue", [solid((0, 0, 255))], top_k=10).indices.shape == (1, 1)
    with pytest.raises(ValueError, match="both texts"):
        kci.retrieve(model, ["red"], ["green"])
    with pytest.raises(ValueError, match="empty"):
        kci.retrieve(model, ["red"], np.zeros((0, 8, 8, 3), np.uint8))


def test_merge_keeps_the_global_top_k():
    rng = np.random.RandomState(0)
    scores = rng.randn(5, 40).astype(np.float32)
    best = np.full((5, 0), -np.inf, np.float32), np.zeros((5, 0), np.int64)
    for start in range(0, 40, 7):
        best = retrieval._merge_top_k(*best, scores[:, start : start + 7], start, 4)
    np.testing.assert_array_equal(best[1], np.argsort(-scores, axis=1)[:, :4])


def test_models_with_their_own_similarity_are_scored_by_it():
    class Reversed(ColourModel):
        def similarity(self, images, texts):
            return -(images @ texts.T)

    result = kci.retrieve(Reversed(), ["red"], [solid((200, 0, 0)), solid((0, 0, 200))], top_k=1)
    assert result.indices.tolist() == [[1]]


def test_occlusion_map_peaks_on_the_object():
    image = np.full((64, 96, 3), 128, np.uint8)
    image[8:24, 60:84] = (255, 0, 0)  # a red object top right
    heatmap = kci.localize(ColourModel(), image, "red", patch_fraction=0.25, batch_size=5)
    assert heatmap.shape == (64, 96) and heatmap.dtype == np.float32
    y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    assert 8 <= y < 24 and 60 <= x < 84
    assert heatmap[48:, :40].max() < heatmap.max() / 4


def test_patches_cover_the_whole_image():
    assert localization._positions(10, 4, 3) == [0, 3, 6]
    assert localization._positions(11, 4, 3) == [0, 3, 6, 7]
    assert localization._positions(3, 4, 2) == [0]
    with pytest.raises(TypeError):
        kci.localize(ColourModel(), solid((1, 2, 3)), ["red"])
