"""Retrieval metrics that stay correct when an image has several captions.

Every function takes a similarity matrix (queries x gallery) and which gallery items are right for each
query. The rank of a query is 1 + the number of wrong gallery items scored at least as high as its best
right item, so ties never flatter a model and several right items count once (CLIP-Italian's hits@k
and MRR@k, open_clip's R@k).
"""

import numpy as np

# Queries ranked at once: bounds memory to CHUNK x gallery floats for large galleries.
CHUNK = 1024


def _positives_mask(positives, shape, start, stop):
    queries, gallery = shape
    if isinstance(positives, np.ndarray) and positives.dtype == bool:
        if positives.shape != (queries, gallery):
            raise ValueError(f"a boolean positives mask must have shape {(queries, gallery)}, got {positives.shape}")
        return positives[start:stop]
    mask = np.zeros((stop - start, gallery), bool)
    for row, right in enumerate(positives[start:stop]):
        indices = np.atleast_1d(np.asarray(right, dtype=np.int64))
        if indices.size == 0:
            raise ValueError(f"query {start + row} has no right gallery item")
        if indices.min() < 0 or indices.max() >= gallery:
            raise ValueError(f"query {start + row} names gallery item {int(indices.max())}, beyond {gallery}")
        mask[row, indices] = True
    return mask


def ranks(similarity, positives):
    """The 1-based rank of the best right gallery item for each query.

    Args:
        similarity: float array (Q, G), higher is better.
        positives: the right gallery items per query: an int array (Q,), a list of index lists (several
            right items per query), or a boolean mask (Q, G).

    Returns:
        int64 array (Q,).

    Example:
    >>> ranks(np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]]), [[2], [0, 1]]).tolist()
    [2, 1]
    """
    similarity = np.asarray(similarity, dtype=np.float32)
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (queries, gallery), got shape {similarity.shape}")
    if len(positives) != similarity.shape[0]:
        raise ValueError(f"{len(positives)} positives for {similarity.shape[0]} queries")
    out = np.empty(similarity.shape[0], np.int64)
    for start in range(0, similarity.shape[0], CHUNK):
        stop = min(start + CHUNK, similarity.shape[0])
        scores = similarity[start:stop]
        mask = _positives_mask(positives, similarity.shape, start, stop)
        best = np.where(mask, scores, -np.inf).max(axis=1, keepdims=True)
        # Wrong items tied with the best right one rank above it: a constant model earns the worst rank.
        out[start:stop] = 1 + ((scores > best) | ((scores == best) & ~mask)).sum(axis=1)
    return out


def recall_at_k(similarity, positives, k):
    """Fraction of queries with a right item among the top `k` (open_clip's R@k, CLIP-Italian's hits@k)."""
    return float(np.mean(ranks(similarity, positives) <= k))


hits_at_k = recall_at_k


def mrr_at_k(similarity, positives, k):
    """Mean reciprocal rank, counting 0 for queries whose first right item is below rank `k`."""
    r = ranks(similarity, positives)
    return float(np.mean(np.where(r <= k, 1.0 / r, 0.0)))


def retrieval_metrics(similarity, image_of_text, ks=(1, 5, 10)):
    """Image-to-text and text-to-image metrics with readable names, from an image-text similarity matrix.

    Args:
        similarity: float (I, T) scores of every image against every text (for a DualEncoder the inner
            products of its embeddings, for ASIF of its relative representations).
        image_of_text: int (T,): the image each text describes (several texts may share one image).
        ks: the cut-offs reported.

    Returns:
        dict like {"image_to_text_R@1": ..., "text_to_image_R@10": ..., "image_to_text_mean_rank": ...,
        "text_to_image_MRR@10": ...}.
    """
    similarity = np.asarray(similarity, np.float32)
    image_of_text = np.asarray(image_of_text, np.int64)
    if similarity.ndim != 2 or similarity.shape[1] != len(image_of_text):
        raise ValueError(f"similarity {similarity.shape} must be (images, {len(image_of_text)} texts)")
    texts_of_image = [[] for _ in range(similarity.shape[0])]
    for text, image in enumerate(image_of_text):
        texts_of_image[image].append(text)
    results = {}
    for name, scores, positives in [
        ("image_to_text", similarity, texts_of_image),
        ("text_to_image", similarity.T, image_of_text),
    ]:
        r = ranks(scores, positives)
        for k in ks:
            results[f"{name}_R@{k}"] = float(np.mean(r <= k))
        results[f"{name}_MRR@{max(ks)}"] = float(np.mean(np.where(r <= max(ks), 1.0 / r, 0.0)))
        results[f"{name}_mean_rank"] = float(r.mean())
        results[f"{name}_median_rank"] = float(np.median(r))
    return results
