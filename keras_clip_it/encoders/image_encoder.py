"""The image tower: a keras-hub vision backbone with its preprocessing and pooling."""

import keras
import numpy as np
from keras import ops

from keras_clip_it.data.images import as_image_batch
from keras_clip_it.data.images import load_images
from keras_clip_it.encoders import presets
from keras_clip_it.encoders.base import EncoderMixin
from keras_clip_it.encoders.base import l2_normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("avg", "cls", "none")


@keras.saving.register_keras_serializable(package="keras_clip_it")
class ImageEncoder(EncoderMixin, keras.Model):
    """Maps images to one feature vector each, owning the preprocessing the backbone was trained with.

    The model itself takes pixels (0 to 255, at `image_size`) and normalises them inside `call`, so a
    saved or exported encoder needs no separate preprocessing step. Host-side work that cannot run in a
    graph (decoding files, resizing, cropping) is `preprocess`; `embed` chains both and returns
    L2-normalised float32 rows, the form that retrieval, ASIF and collections use.

    Args:
        backbone: a `keras.Model` (usually a keras-hub `Backbone`) mapping normalised images
            (B, H, W, 3) to a feature map (B, h, w, C), a token sequence (B, T, C) or a vector (B, C).
        image_size: (height, width) the backbone expects.
        mean: per-channel mean of pixels scaled to [0, 1], subtracted before the backbone.
        std: per-channel standard deviation of pixels scaled to [0, 1].
        crop_pct: host-side resize of the shorter side to `image_size / crop_pct`, then a centre crop.
        resample: "bilinear", "bicubic", "lanczos" or "nearest".
        pooling: "avg" averages all spatial or token positions, "cls" takes the first token, "none"
            uses a backbone that already returns (B, C). With "cls", a backbone that has
            `call_at(images, positions)` (kci's `CLIPVisionTower`) computes its last block at that token alone.
        head: optional layer mapping pooled features to class logits (for example the ImageNet
            classifier of a pretrained CNN), used by `classify`.
        class_names: names of the head's classes.

    Example:
    >>> encoder = ImageEncoder.from_preset("efficientnet_lite0_imagenet")  # doctest: +SKIP
    >>> encoder.embed(np.zeros((2, 300, 400, 3), np.uint8)).shape  # doctest: +SKIP
    (2, 1280)
    """

    def __init__(
        self,
        backbone,
        image_size=(224, 224),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_pct=0.875,
        resample="bicubic",
        pooling="avg",
        head=None,
        class_names=None,
        **kwargs,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if head is not None and class_names is not None:
            units = getattr(head, "units", None)
            if units is not None and units != len(class_names):
                raise ValueError(f"the head has {units} classes but {len(class_names)} class_names were given")
        super().__init__(**kwargs)

        # === Layers ===
        self.backbone = backbone
        self.head = head

        # === Config ===
        self.image_size = image_size
        self.mean = tuple(float(value) for value in mean)
        self.std = tuple(float(value) for value in std)
        self.crop_pct = float(crop_pct)
        self.resample = resample
        self.pooling = pooling
        self.class_names = list(class_names) if class_names is not None else None
        # (x / 255 - mean) / std as one multiply-add, in float32 numpy so no float64 reaches TF ops.
        self._scale = np.asarray([1.0 / (255.0 * s) for s in self.std], np.float32)
        self._offset = np.asarray([-m / s for m, s in zip(self.mean, self.std)], np.float32)

        # === Build ===
        features = self._pool(self.backbone(keras.KerasTensor((None, *image_size, 3))))
        self._embedding_dim = int(features.shape[-1])
        if self.head is not None and not self.head.built:
            self.head.build((None, self._embedding_dim))
        self.built = True

    @property
    def embedding_dim(self):
        """Size of the pooled features."""
        return self._embedding_dim

    def _pool(self, features):
        if isinstance(features, dict):
            features = features.get("pooled_output", features.get("sequence_output"))
        if self.pooling == "none":
            return features
        if self.pooling == "cls":
            return features[:, 0]
        axes = tuple(range(1, len(features.shape) - 1))
        return ops.mean(features, axis=axes) if axes else features

    def call(self, images, training=False):
        x = ops.cast(images, self.compute_dtype)
        x = x * ops.cast(self._scale, x.dtype) + ops.cast(self._offset, x.dtype)
        if self.pooling == "cls" and hasattr(self.backbone, "call_at") and not keras.backend.is_keras_tensor(x):
            # A tower that can compute its last block at the class token alone (CLIPVisionTower);
            # symbolic inputs (shape inference) take the plain path, which gives the same shape.
            return self.backbone.call_at(x, ops.zeros((ops.shape(x)[0],), "int32"), training=training)
        return self._pool(self.backbone(x, training=training))

    def preprocess(self, inputs):
        """Decodes, resizes and centre-crops any accepted images to uint8 (N, H, W, 3)."""
        return load_images(inputs, size=self.image_size, crop_pct=self.crop_pct, resample=self.resample)

    def embed(self, inputs, batch_size=32, progress=None):
        """Embeds images as L2-normalised float32 rows.

        Args:
            inputs: a uint8 array (N, H, W, 3), (H, W, 3) or (N, H, W) grey, or a list of arrays, PIL
                images, paths, fsspec URIs or encoded bytes (`keras_clip_it.data.images.as_image_batch`).
            batch_size: images run through the network at once.
            progress: show a progress bar (None: only for long runs).

        Returns:
            float32 array (N, embedding_dim).
        """
        items = as_image_batch(inputs)
        features = self._run_batches(
            len(items),
            lambda start, stop: self.preprocess(items[start:stop]),
            batch_size,
            progress,
            "embedding images",
        )
        return l2_normalize(features)

    def classify(self, inputs, top_k=5, batch_size=32):
        """The head's top-k classes for each image, as lists of (class_name, probability).

        Example:
        >>> encoder.classify(skimage.data.coffee())[0][0]  # doctest: +SKIP
        ('espresso', 0.6...)
        """
        if self.head is None:
            raise ValueError("this encoder has no classification head: build it with head= and class_names=")
        items = as_image_batch(inputs)
        features = self._run_batches(
            len(items), lambda start, stop: self.preprocess(items[start:stop]), batch_size, None, "classifying"
        )
        logits = np.array(self.head(features), np.float32)
        logits -= logits.max(axis=-1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=-1, keepdims=True)
        names = self.class_names or [str(index) for index in range(probabilities.shape[-1])]
        best = np.argsort(-probabilities, axis=-1)[:, :top_k]
        return [[(names[j], float(row[j])) for j in order] for row, order in zip(probabilities, best)]

    @classmethod
    def from_image_converter(cls, backbone, converter, **kwargs):
        """Wraps a keras-hub backbone with the resizing and scaling of its keras-hub `ImageConverter`."""
        scale = np.broadcast_to(np.asarray(converter.scale if converter.scale is not None else 1 / 255.0), (3,))
        offset = np.broadcast_to(np.asarray(converter.offset if converter.offset is not None else 0.0), (3,))
        # x * scale + offset == (x / 255 - mean) / std
        std = [1.0 / (255.0 * float(s)) for s in scale]
        mean = [-float(o) * s for o, s in zip(offset, std)]
        size = converter.image_size or (224, 224)
        # keras-hub converters resize straight to the model size (after an aspect-ratio crop).
        kwargs.setdefault("crop_pct", 1.0)
        return cls(backbone=backbone, image_size=size, mean=mean, std=std, **kwargs)

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """Loads an image encoder.

        Args:
            preset: an embedded preset ("efficientnet_lite0_imagenet", offline), a keras-hub preset
                name, "hf://org/name", "kaggle://...", or a local keras-hub or Hugging Face directory.
        """
        return presets.load_preset("image", preset, cls.from_keras_hub, **kwargs)

    @classmethod
    def from_keras_hub(cls, preset, **kwargs):
        """A keras-hub image backbone with the resizing and scaling of the preset's `ImageConverter`."""
        import keras_hub

        backbone = keras_hub.models.Backbone.from_preset(preset)
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
        return cls.from_image_converter(backbone, converter, **kwargs)

    def get_config(self):
        config = {"name": self.name, "trainable": self.trainable}
        config.update(
            {
                "backbone": keras.layers.serialize(self.backbone),
                "image_size": list(self.image_size),
                "mean": list(self.mean),
                "std": list(self.std),
                "crop_pct": self.crop_pct,
                "resample": self.resample,
                "pooling": self.pooling,
                "head": keras.layers.serialize(self.head) if self.head is not None else None,
                "class_names": self.class_names,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        presets.import_keras_modules()  # the backbone may be an architecture folder's class
        config["backbone"] = keras.layers.deserialize(config["backbone"])
        if config.get("head") is not None:
            config["head"] = keras.layers.deserialize(config["head"])
        return cls(**config)
