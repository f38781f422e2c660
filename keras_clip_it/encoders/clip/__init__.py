"""CLIP: kci's towers and layers (fast training on CPU) and the converter of Hugging Face CLIP checkpoints.

Importing this folder registers the converters of "clip_vision_model" and "clip" folders for
`ImageEncoder.from_preset` (a "clip" folder gives its image tower) and the module of its towers, named by
their paths and imported on first use. The dual-encoder converters that use
`clip_converter.load_dual_encoder_checkpoint` are registered by `keras_clip_it.models`.
"""

from keras_clip_it.encoders import presets

presets.register_keras_module(f"{__name__}.clip_towers")
presets.register_converter("image", "clip_vision_model", f"{__name__}.clip_converter:load_clip_vision_model")
presets.register_converter("image", "clip", f"{__name__}.clip_converter:load_clip_vision_model")
