"""Models over the towers: `DualEncoder` (CLIP, LiT) and `ASIF`.

Importing the package registers the Hugging Face dual-encoder converters (`hf_dual_encoder`) that
`DualEncoder.from_preset` looks up, whichever models module is imported first.
"""

from keras_clip_it.models import hf_dual_encoder  # noqa: F401
