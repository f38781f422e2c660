"""LiT feature caching: a locked tower's features computed once, and a stand-in tower that feeds them.

A locked image tower gives the same features in every epoch, so LiT-style training need not run it at
all: its features are computed once (`cached_features`, kept on disk across runs) and a `DualEncoder`
built on `CachedFeatures` trains its heads and the text tower on them (`feature_pairs`). A linear
projection without bias followed by L2 normalisation ignores the scale of its input, so the cached
(normalised) features give exactly the embeddings of the real tower; `copy_heads` then moves the
trained heads into the model with the real tower, which takes pixels.
"""

import os

import keras
import numpy as np

from keras_clip_it.cache import cache_dir


def cached_features(encoder, images, key):
    """`encoder.embed(images)`, cached as .npy under the package cache, keyed by the encoder's weights.

    Args:
        encoder: a `kci.ImageEncoder` (anything with `embed` and `fingerprint`).
        images: what `encoder.embed` takes.
        key: str naming the images (say "emoji_128px_1500_400"): the same key must mean the same images.

    Returns:
        float32 (N, D) features, read from the cache when a previous run computed them.

    Example:
    >>> features = cached_features(image_encoder, images, key="emoji_train")  # doctest: +SKIP
    """
    path = os.path.join(cache_dir("features"), f"features_{encoder.fingerprint[:16]}_{key}.npy")
    if os.path.exists(path):
        return np.load(path, allow_pickle=False)
    features = encoder.embed(images, progress=False)
    np.save(path + ".tmp.npy", features)
    os.replace(path + ".tmp.npy", path)  # a crash leaves no half-written cache behind
    return features


@keras.saving.register_keras_serializable(package="keras_clip_it")
class CachedFeatures(keras.layers.Layer):
    """Stands in for a locked image tower whose features were computed once: passes them through.

    Its `preprocess` stacks feature rows, so `DualEncoder.encode_images(list(features))` works as with
    pixels.

    Args:
        embedding_dim: int, the size of the features (the real tower's `embedding_dim`).

    Example:
    >>> trainer = kci.DualEncoder(CachedFeatures(image_encoder.embedding_dim), text_encoder)  # doctest: +SKIP
    """

    def __init__(self, embedding_dim, name="cached_image_features", **kwargs):
        super().__init__(name=name, **kwargs)
        self.embedding_dim = int(embedding_dim)

    def call(self, features, training=False):
        return features

    def preprocess(self, rows):
        """Feature rows (a list of (D,) arrays) as one float32 (N, D) batch."""
        return np.asarray(np.stack(rows), np.float32)

    def get_config(self):
        return {**super().get_config(), "embedding_dim": self.embedding_dim}


def feature_pairs(features, tokens, batch_size, seed=None):
    """The `fit` input of a model on `CachedFeatures`: what `kci.data.pairs` gives, with features for pixels.

    Args:
        features: float32 (N, D) cached features.
        tokens: the text tower's token dict of the N captions (`text_encoder.tokenize(captions)`).
        batch_size: pairs per batch; the last incomplete batch is dropped (static shapes).
        seed: shuffling seed, for reproducible runs.

    Returns:
        a `tf.data.Dataset` of `{"images": features, "texts": tokens}` batches, reshuffled every epoch.
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices({"images": features, "texts": tokens})
    dataset = dataset.shuffle(len(features), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def copy_heads(source, target):
    """Copies the projection heads, the temperature and the logit bias of one dual encoder into another.

    Args:
        source: the `DualEncoder` trained on `CachedFeatures`.
        target: the `DualEncoder` with the real towers.
    """
    for name in ("image_projection", "text_projection"):
        getattr(target, name).set_weights(getattr(source, name).get_weights())
    # A numpy copy: on JAX the two models must not share one buffer (a step may donate it).
    target.log_logit_scale.assign(np.asarray(source.log_logit_scale))
    if source.logit_bias is not None and target.logit_bias is not None:
        target.logit_bias.assign(np.asarray(source.logit_bias))
