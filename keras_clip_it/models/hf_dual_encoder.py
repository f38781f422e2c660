"""Hugging Face "clip" and "vision-text-dual-encoder" folders as `DualEncoder`s."""

import math

from keras_clip_it.encoders.hf_clip import load_dual_encoder_checkpoint
from keras_clip_it.models.dual_encoder import DualEncoder


def load_hf_dual_encoder(directory, learn_logit_scale=True):
    """Builds a `DualEncoder` with a checkpoint's towers, projections and temperature.

    Args:
        directory: a local Hugging Face folder (openai/clip-vit-*, clip-italian/clip-italian).
        learn_logit_scale: keep fine-tuning the temperature (CLIP) or hold it fixed.

    Example:
    >>> model = kci.DualEncoder.from_preset("hf://clip-italian/clip-italian")  # doctest: +SKIP
    >>> model.encode_texts(["una foto di un gatto"]).shape  # doctest: +SKIP
    (1, 512)
    """
    parts = load_dual_encoder_checkpoint(directory)
    scale = math.exp(parts.logit_scale)
    model = DualEncoder(
        parts.image_encoder,
        parts.text_encoder,
        projection_dim=parts.projection_dim,
        logit_scale=scale,
        learn_logit_scale=learn_logit_scale,
        max_logit_scale=max(100.0, scale),
    )
    model.image_projection.kernel.assign(parts.image_projection)
    model.text_projection.kernel.assign(parts.text_projection)
    return model
