"""Analogy collections: the (image, caption) pairs behind ASIF, their storage and plugins."""

from keras_clip_it.collections.analogy_collection import AnalogyCollection  # noqa: F401
from keras_clip_it.collections.embedding_cache import embedded_collection  # noqa: F401
from keras_clip_it.collections.registry import available  # noqa: F401
from keras_clip_it.collections.registry import broken  # noqa: F401
from keras_clip_it.collections.registry import get_spec  # noqa: F401
from keras_clip_it.collections.registry import load  # noqa: F401
from keras_clip_it.collections.specs import CollectionSpec  # noqa: F401
from keras_clip_it.collections.specs import RawPair  # noqa: F401
