"""The FAISS backend of kci.retrieve gives the numpy backend's results on galleries of dense embeddings."""

import sys

import numpy as np
import pytest

import keras_clip_it as kci


class TableModel:
    """Dense unit embeddings looked up by item: text "item 7" and the image whose pixels hold 7 share a row."""

    def __init__(self, count=3000, dim=48, seed=0):
        vectors = np.random.RandomState(seed).randn(count, dim).astype(np.float32)
        self.vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        self.image_noise = np.random.RandomState(seed + 1).randn(count, dim).astype(np.float32) * 0.05

    def images(self, rows):
        rows = np.asarray(rows)
        pixels = np.zeros((len(rows), 2, 2, 3), np.uint8)
        pixels[:, 0, 0, 0], pixels[:, 0, 0, 1] = rows // 256, rows % 256
        return pixels

    def encode_images(self, images):
        rows = images[:, 0, 0, 0].astype(np.int64) * 256 + images[:, 0, 0, 1]
        vectors = self.vectors[rows] + self.image_noise[rows]  # an image is near, not on, its text
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def encode_texts(self, texts):
        return self.vectors[[int(text.split()[-1]) for text in texts]]


@pytest.fixture(scope="module")
def faiss():
    return pytest.importorskip("faiss", reason="the FAISS backend needs faiss-cpu")


def assert_same(left, right):
    np.testing.assert_array_equal(left.indices, right.indices)
    np.testing.assert_allclose(left.scores, right.scores, atol=1e-5)
    assert left.indices.dtype == right.indices.dtype == np.int64 and right.scores.dtype == np.float32


def test_text_to_image_over_a_chunked_gallery_equals_numpy(faiss):
    model = TableModel()
    gallery = model.images(np.arange(3000))
    queries = [f"item {i}" for i in (3, 1500, 2999, 42, 7)]
    exact = kci.retrieve(model, queries, gallery, top_k=20, chunk_size=700)
    fast = kci.retrieve(model, queries, gallery, top_k=20, chunk_size=700, backend="faiss")
    assert_same(exact, fast)
    assert fast.indices[:, 0].tolist() == [3, 1500, 2999, 42, 7]


def test_image_to_text_and_top_k_beyond_the_gallery_equal_numpy(faiss):
    model = TableModel(count=300)
    texts = [f"item {i}" for i in range(300)]
    queries = model.images([5, 250])
    assert_same(kci.retrieve(model, queries, texts, top_k=10), kci.retrieve(model, queries, texts, top_k=10, backend="faiss"))
    everything = kci.retrieve(model, queries, texts[:4], top_k=50, backend="faiss")
    assert everything.indices.shape == (2, 4) and (everything.indices >= 0).all()


def test_faiss_refuses_models_that_score_their_own_representations(faiss):
    class Sparse(TableModel):
        def similarity(self, images, texts):
            return images @ texts.T

    model = Sparse(count=10)
    with pytest.raises(ValueError, match="backend='numpy'"):
        kci.retrieve(model, ["item 1"], model.images([1, 2]), backend="faiss")


def test_bad_backend_and_missing_faiss(monkeypatch):
    model = TableModel(count=10)
    with pytest.raises(ValueError, match="backend must be one of"):
        kci.retrieve(model, ["item 1"], model.images([1, 2]), backend="annoy")
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss-cpu were not installed
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        kci.retrieve(model, ["item 1"], model.images([1, 2]), backend="faiss")
