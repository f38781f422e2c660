"""Hugging Face "clip" and "vision-text-dual-encoder" folders as `DualEncoder`s.

Importing this module (`keras_clip_it.models` does) registers `load_hf_dual_encoder` as the "dual"
converter of both model types, which `DualEncoder.from_preset` looks up.
"""

import math

from keras_clip_it.encoders import presets


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
    # Imported here, so that registering the converter (on any import of keras_clip_it.models) costs
    # neither keras-hub nor the DualEncoder module, which never imports this one.
    from keras_clip_it.encoders.clip.clip_converter import load_dual_encoder_checkpoint
    from keras_clip_it.models.dual_encoder import DualEncoder

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


presets.register_converter("dual", "clip", load_hf_dual_encoder)
presets.register_converter("dual", "vision-text-dual-encoder", load_hf_dual_encoder)
