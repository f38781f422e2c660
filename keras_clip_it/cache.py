"""Where the package keeps what it derives once and reuses: converted weights, embeddings, images."""

import os


def cache_dir(*parts):
    """The cache folder ($KERAS_CLIP_IT_CACHE, else ~/.cache/keras_clip_it), or a subfolder of it, created."""
    root = os.environ.get("KERAS_CLIP_IT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "keras_clip_it")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path
