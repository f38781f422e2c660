"""keras-clip-it: image-text models in Keras 3, with Italian as a first-class language.

JAX is the default backend: set ``KERAS_BACKEND`` before importing to choose another.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

from keras_clip_it.version import __version__  # noqa: E402
from keras_clip_it.encoders import ImageEncoder  # noqa: E402
from keras_clip_it.encoders import TextEncoder  # noqa: E402
from keras_clip_it.tasks import metrics  # noqa: E402
from keras_clip_it import collections  # noqa: E402
from keras_clip_it.collections.hookspecs import hookimpl  # noqa: E402
from keras_clip_it.tasks.localization import localize  # noqa: E402
from keras_clip_it.tasks.retrieval import retrieve  # noqa: E402
from keras_clip_it.tasks import plot  # noqa: E402
from keras_clip_it import cache, callbacks, data, losses, serving  # noqa: E402
from keras_clip_it.data import datasets  # noqa: E402
from keras_clip_it.models.dual_encoder import DualEncoder  # noqa: E402
from keras_clip_it.models.asif import ASIF  # noqa: E402
from keras_clip_it.tasks.zero_shot import ZeroShotClassifier  # noqa: E402
from keras_clip_it.tasks.evaluate import evaluate  # noqa: E402
