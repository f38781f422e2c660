import numpy as np
import pytest

from keras_clip_it.tasks import metrics


def brute_force_rank(scores, right):
    """Rank by sorting: position of the first right item when ties are broken against the model."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j in right))
    return 1 + min(order.index(j) for j in right)


def test_ranks_match_a_sort_with_several_right_items():
    rng = np.random.RandomState(0)
    similarity = rng.randint(0, 5, (40, 12)).astype(np.float32)  # many ties
    positives = [list(rng.choice(12, size=rng.randint(1, 4), replace=False)) for _ in range(40)]
    expected = [brute_force_rank(list(row), set(right)) for row, right in zip(similarity, positives)]
    assert metrics.ranks(similarity, positives).tolist() == expected
    mask = np.zeros((40, 12), bool)
    for row, right in enumerate(positives):
        mask[row, right] = True
    assert metrics.ranks(similarity, mask).tolist() == expected


def test_recall_mrr_and_hits_on_a_hand_computed_case():
    similarity = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.1, 0.2, 0.3]])
    positives = [[2], [0, 1], [0]]  # ranks 2, 1, 3
    assert metrics.recall_at_k(similarity, positives, 1) == pytest.approx(1 / 3)
    assert metrics.hits_at_k(similarity, positives, 2) == pytest.approx(2 / 3)
    assert metrics.mrr_at_k(similarity, positives, 2) == pytest.approx((1 / 2 + 1) / 3)
    assert metrics.mrr_at_k(similarity, positives, 3) == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)


def test_chunking_does_not_change_ranks(monkeypatch):
    rng = np.random.RandomState(1)
    similarity = rng.randn(50, 30)
    positives = rng.randint(0, 30, 50)
    expected = metrics.ranks(similarity, positives)
    monkeypatch.setattr(metrics, "CHUNK", 7)
    np.testing.assert_array_equal(metrics.ranks(similarity, positives), expected)


def test_retrieval_metrics_with_several_captions_per_image():
    rng = np.random.RandomState(2)
    images = rng.randn(5, 8)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    image_of_text = np.array([0, 0, 1, 2, 3, 4, 4])
    texts = images[image_of_text] + 0.01 * rng.randn(7, 8)
    results = metrics.retrieval_metrics(images @ texts.T, image_of_text)
    assert results["image_to_text_R@1"] == 1.0 and results["text_to_image_R@1"] == 1.0
    assert results["text_to_image_mean_rank"] == 1.0 and "image_to_text_MRR@10" in results
    shuffled = metrics.retrieval_metrics(images @ texts[::-1].T, image_of_text)
    assert shuffled["text_to_image_R@1"] < 1.0


@pytest.mark.parametrize(
    "positives, message",
    [([[0]], "1 positives for 2 queries"), ([[0], []], "no right gallery item"), ([[0], [9]], "beyond 3")],
)
def test_bad_positives(positives, message):
    with pytest.raises(ValueError, match=message):
        metrics.ranks(np.zeros((2, 3)), positives)
