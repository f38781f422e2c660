"""Unimodal towers: `ImageEncoder`, `TextEncoder`, their presets, and one folder per architecture.

Importing the architecture folders registers their presets and converters with `presets`, so
`from_preset` knows them without the user importing a folder; each registers paths of its loaders,
so this costs no import of keras-hub.
"""

from keras_clip_it.encoders import clip  # noqa: F401
from keras_clip_it.encoders import e5  # noqa: F401
from keras_clip_it.encoders import efficientnet_lite  # noqa: F401
from keras_clip_it.encoders import minilm  # noqa: F401
from keras_clip_it.encoders.image_encoder import ImageEncoder
from keras_clip_it.encoders.text_encoder import TextEncoder
