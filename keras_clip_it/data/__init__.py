"""Image-caption input pipelines, image decoding and the embedded datasets."""

from keras_clip_it.data.pairs import pairs  # noqa: F401
