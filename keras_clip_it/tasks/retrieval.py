"""Text-to-image and image-to-text retrieval over galleries of any size."""

from dataclasses import dataclass

import numpy as np

from keras_clip_it.tasks.common import as_list
from keras_clip_it.tasks.common import is_text_batch
from keras_clip_it.tasks.common import similarity


@dataclass
class RetrievalResult:
    """The best gallery items per query, best first.

    Attributes:
        indices: int64 (queries, top_k) positions in the gallery.
        scores: float32 (queries, top_k) similarities.
    """

    indices: np.ndarray
    scores: np.ndarray

    def __getitem__(self, query):
        """[(gallery index, score), ...] for one query."""
        return list(zip(self.indices[query].tolist(), self.scores[query].tolist()))

    def __len__(self):
        return len(self.indices)


def _merge_top_k(best_scores, best_indices, scores, offset, top_k):
    candidates = np.concatenate([best_scores, scores], axis=1)
    indices = np.concatenate([best_indices, offset + np.arange(scores.shape[1])[None].repeat(len(scores), 0)], axis=1)
    keep = np.argsort(-candidates, axis=1, kind="stable")[:, :top_k]
    return np.take_along_axis(candidates, keep, 1), np.take_along_axis(indices, keep, 1)


def retrieve(model, queries, gallery, top_k=10, chunk_size=1024):
    """Ranks a gallery of the other modality for each query: texts -> images or images -> texts.

    The gallery is encoded and scored in chunks with a running top-k, so it can be far larger than
    memory would hold as one similarity matrix.

    Args:
        model: a `DualEncoder` or an `ASIF` (anything with `encode_images` / `encode_texts`).
        queries: texts (a string or a list of strings) or images (arrays, PIL images, paths, URIs).
        gallery: items of the other modality.
        top_k: items returned per query.
        chunk_size: gallery items encoded at once.

    Returns:
        `RetrievalResult` with (queries, min(top_k, len(gallery))) indices and scores.

    Example:
    >>> result = kci.retrieve(model, ["un gatto"], images, top_k=3)  # doctest: +SKIP
    >>> result[0]  # doctest: +SKIP
    [(17, 0.31), (4, 0.29), (40, 0.27)]
    """
    text_queries = is_text_batch(queries)
    if text_queries == is_text_batch(gallery):
        kind = "texts" if text_queries else "images"
        raise ValueError(
            f"queries and gallery are both {kind}: retrieval goes from texts to images or from images to texts"
        )
    queries, gallery = as_list(queries), as_list(gallery)
    if len(gallery) == 0:
        raise ValueError("the gallery is empty")
    encode_queries = model.encode_texts if text_queries else model.encode_images
    encode_gallery = model.encode_images if text_queries else model.encode_texts
    query_representations = encode_queries(queries)
    top_k = min(top_k, len(gallery))
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_indices = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(gallery), chunk_size):
        chunk = encode_gallery(gallery[start : start + chunk_size])
        if text_queries:
            scores = similarity(model, chunk, query_representations).T
        else:
            scores = similarity(model, query_representations, chunk)
        best_scores, best_indices = _merge_top_k(best_scores, best_indices, scores, start, top_k)
    return RetrievalResult(best_indices, best_scores.astype(np.float32))
