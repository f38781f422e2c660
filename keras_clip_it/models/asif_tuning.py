"""Choosing ASIF's k, p and centring from the collection alone, by retrieving its own held-out pairs.

No labels are needed: part of the collection's pairs are held out, the rest serve as anchors, and each
setting is scored by how often a held-out image finds its own caption, and a caption its own image, at
rank 1. Each side is searched once per centring, for the largest k tried; every smaller k and every p
are cut from that one answer, so the cost is two searches per centring plus the small score matrices.
"""

import itertools

import numpy as np

from keras_clip_it.models.asif_state import RelativeRepresentation
from keras_clip_it.models.asif_state import center_rows
from keras_clip_it.models.asif_state import normalize
from keras_clip_it.models.asif_state import sparse_inner

KS = (10, 40, 160, 800)
PS = (4.0, 8.0, 16.0)
# Held-out queries x anchors up to which the pair scores are one dense product instead of a sparse join
# (a small collection makes the join's matches grow as queries^2 k^2 / anchors).
_DENSE = 2**24


def tune_settings(asif, ks=KS, ps=PS, centers=(True, False), held_out=0.2, max_queries=1000, seed=0):
    """Scores every (center, k, p) on held-out pairs of `asif`'s collection; returns the report.

    Args:
        asif: an `ASIF` with a collection of at least 10 pairs.
        ks, ps: the k and p values tried.
        centers: the centring settings tried.
        held_out: fraction of the pairs held out as queries (at most `max_queries`).
        seed: the seed of the held-out draw (the same collection and seed give the same choice).

    Returns:
        {"tried": [{"center", "k", "p", "image_to_text_R@1", "text_to_image_R@1", "score"}, ...],
        "chosen": the best of them, "pairs": N, "queries": Q}; ties go to the first tried.
    """
    state = asif.snapshot()
    collection = state.collection
    if state.pairs < 10:
        raise ValueError(f"tune() needs at least 10 pairs in the collection, it has {state.pairs}")
    queries = min(max(1, int(round(held_out * state.pairs))), int(max_queries), state.pairs // 2)
    order = np.random.default_rng(seed).permutation(state.pairs)
    query_rows, anchor_rows = np.sort(order[:queries]), np.sort(order[queries:])
    fingerprints = state.anchors.fingerprints
    anchors = collection.copy(rows=anchor_rows, name=f"{collection.name}-tuning", fingerprints=fingerprints)
    embeddings = {kind: np.array(collection.embeddings(kind, fingerprints[kind])[query_rows]) for kind in fingerprints}
    tried = []
    for center in centers:
        trial = asif.replica()
        trial.center = center
        trial.use(anchors)
        trial_state = trial.snapshot()
        found = {}
        for kind in ("image", "text"):
            index = trial_state.index(kind)
            rows = center_rows(normalize(embeddings[kind]), trial_state.anchors.center(kind))
            found[kind] = index.topk(rows, min(max(ks), index.size))
        for k, p in itertools.product(ks, ps):
            scores = _pair_scores(found, k, p, len(anchor_rows))
            truth = np.arange(queries)
            image_to_text = float(np.mean(scores.argmax(axis=1) == truth))
            text_to_image = float(np.mean(scores.argmax(axis=0) == truth))
            tried.append({"center": bool(center), "k": int(k), "p": float(p), "image_to_text_R@1": image_to_text,
                          "text_to_image_R@1": text_to_image, "score": (image_to_text + text_to_image) / 2})
    chosen = max(tried, key=lambda row: row["score"])  # max keeps the first of equal scores
    return {"tried": tried, "chosen": chosen, "pairs": int(state.pairs), "queries": int(queries)}


def _pair_scores(found, k, p, size):
    """(Q, Q) scores of held-out images (rows) against held-out captions (columns) at this k and p."""
    sides = []
    for kind in ("image", "text"):
        similarities, rows = found[kind]
        weights = np.maximum(similarities[:, :k], 0.0) ** p
        norms = np.linalg.norm(weights, axis=1, keepdims=True)
        weights = np.where(norms > 0, weights / np.maximum(norms, 1e-30), 0.0).astype(np.float32)
        sides.append(RelativeRepresentation(rows[:, :k], weights, size, 0))
    if len(sides[0]) * size <= _DENSE:
        return sides[0].to_dense() @ sides[1].to_dense().T
    return sparse_inner(sides[0], sides[1])
