"""Text-to-image and image-to-text retrieval over galleries of any size.

Two exact search backends give the same results: "numpy" scores each gallery chunk with the model's
own similarity and keeps a running top-k (any model, ASIF's sparse representations included), and
"faiss" adds dense gallery embeddings to a FAISS `IndexFlatIP` (exact inner-product search, from
`pip install faiss-cpu`) and searches all queries at once, for large galleries of a DualEncoder.
"""

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


BACKENDS = ("numpy", "faiss")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("backend='faiss' needs FAISS: pip install faiss-cpu (or use backend='numpy')") from None
    return faiss


def retrieve(model, queries, gallery, top_k=10, chunk_size=1024, backend="numpy", progress=None):
    """Ranks a gallery of the other modality for each query: texts -> images or images -> texts.

    The gallery is encoded in chunks, so it can be far larger than memory would hold as one similarity
    matrix: the "numpy" backend scores each chunk and keeps a running top-k; the "faiss" backend adds
    the chunks' dense embeddings to an exact FAISS inner-product index (`IndexFlatIP`) and searches it
    once, with the same results (up to float rounding in the scores).

    Args:
        model: a `DualEncoder` or an `ASIF` (anything with `encode_images` / `encode_texts`).
        queries: texts (a string or a list of strings) or images (arrays, PIL images, paths, URIs).
        gallery: items of the other modality.
        top_k: items returned per query.
        chunk_size: gallery items encoded at once.
        backend: "numpy" (any model) or "faiss" (models with dense embeddings compared by inner
            product, i.e. a DualEncoder; needs `pip install faiss-cpu`).
        progress: show a progress bar over the gallery chunks (None: only when there are several).

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
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "faiss" and getattr(model, "similarity", None) is not None:
        raise ValueError(
            f"backend='faiss' searches dense embeddings by inner product, but {type(model).__name__} scores "
            "its own representations (ASIF's are sparse): use backend='numpy'"
        )
    faiss = _faiss() if backend == "faiss" else None
    queries, gallery = as_list(queries), as_list(gallery)
    if len(gallery) == 0:
        raise ValueError("the gallery is empty")
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    encode_queries = model.encode_texts if text_queries else model.encode_images
    encode_gallery = model.encode_images if text_queries else model.encode_texts
    query_representations = encode_queries(queries)
    top_k = min(int(top_k), len(gallery))
    if top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    starts = range(0, len(gallery), chunk_size)
    if progress or (progress is None and len(starts) > 1):
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"encoding the gallery ({len(gallery)} items)", unit="chunk")
    if faiss is not None:
        index = None
        for start in starts:
            chunk = np.ascontiguousarray(encode_gallery(gallery[start : start + chunk_size]), np.float32)
            if index is None:
                index = faiss.IndexFlatIP(chunk.shape[1])
            index.add(chunk)
        scores, indices = index.search(np.ascontiguousarray(query_representations, np.float32), top_k)
        return RetrievalResult(indices.astype(np.int64), scores.astype(np.float32))
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_indices = np.zeros((len(queries), 0), np.int64)
    for start in starts:
        chunk = encode_gallery(gallery[start : start + chunk_size])
        if text_queries:
            scores = similarity(model, chunk, query_representations).T
        else:
            scores = similarity(model, query_representations, chunk)
        best_scores, best_indices = _merge_top_k(best_scores, best_indices, scores, start, top_k)
    return RetrievalResult(best_indices, best_scores.astype(np.float32))
