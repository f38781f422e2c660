"""The embedding cache: a registered collection embedded once per pair of encoders, for every later process.

Embedding a plugin's pairs is the slow part of starting a model on them, and the result depends only on
the collection and the two encoders' fingerprints. So it is stored once per (name, image fingerprint,
text fingerprint) under the cache folder (`keras_clip_it.cache.cache_dir("embeddings")`) as an ordinary
stored collection, and every later start loads it instead of embedding again.
"""

import os
import shutil
import sys

import numpy as np

from keras_clip_it.cache import cache_dir
from keras_clip_it.collections import registry


def embedded_collection(name, image_encoder, text_encoder, chunk=256):
    """A collection by name or URI with this pair of encoders' embeddings (cached for registered names).

    A registered collection is embedded in chunks of `chunk` pairs, each kept under the cache folder as
    soon as it is done, so an interrupted first run resumes where it stopped; a cached copy that cannot be
    read is embedded again. A stored collection (a URI or path) is loaded and only its missing
    embeddings are computed, without caching.

    Args:
        name: str, a registered collection name ("emoji-it") or a stored collection's URI or path.
        image_encoder: an encoder with `fingerprint` and `embed(image_refs)`.
        text_encoder: an encoder with `fingerprint` and `embed(captions)`.
        chunk: int, pairs per embedded chunk kept while the first embedding runs.

    Returns:
        An `AnalogyCollection` with embeddings for both encoders.

    Example:
    >>> col = embedded_collection("emoji-it", image_encoder, text_encoder)  # doctest: +SKIP
    """
    if name not in registry.available():
        collection = registry.load(name)
        collection.embed(image_encoder=image_encoder, text_encoder=text_encoder)
        return collection
    key = f"{name}-{image_encoder.fingerprint[:12]}-{text_encoder.fingerprint[:12]}"
    path = os.path.join(cache_dir("embeddings"), key)
    if os.path.isdir(path):
        try:
            return registry.load(path)
        except (ValueError, LookupError, OSError) as error:  # damaged or from an older layout: embed again
            print(f"re-embedding {name!r}: the cached copy cannot be read ({error})", file=sys.stderr)
    print(f"embedding collection {name!r} once (cached in {path})", file=sys.stderr)
    collection = registry.load(name)
    parts = path + ".partial"
    os.makedirs(parts, exist_ok=True)
    for kind, encoder, items in (
        ("text", text_encoder, collection.captions),
        ("image", image_encoder, collection.image_refs),
    ):
        rows = []
        for start in range(0, len(items), chunk):
            part = os.path.join(parts, f"{kind}-{start:08d}.npy")
            if not os.path.exists(part):
                np.save(part + ".tmp.npy", encoder.embed(items[start : start + chunk]))
                os.replace(part + ".tmp.npy", part)
            rows.append(np.load(part, allow_pickle=False))
            print(f"{kind}s: {min(start + chunk, len(items))}/{len(items)}", file=sys.stderr, flush=True)
        collection.set_embeddings(kind, encoder.fingerprint, np.concatenate(rows))
    collection.save(path)
    shutil.rmtree(parts)
    return collection
