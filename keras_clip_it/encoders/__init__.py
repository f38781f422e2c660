"""Unimodal towers: `ImageEncoder`, `TextEncoder`, their presets and weight converters."""

from keras_clip_it.encoders.image_encoder import ImageEncoder
from keras_clip_it.encoders.text_encoder import TextEncoder
