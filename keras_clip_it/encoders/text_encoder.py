"""The text tower: a keras-hub text backbone with its tokenizer and pooling."""

import keras
import numpy as np
from keras import ops

from keras_clip_it.encoders import presets
from keras_clip_it.encoders.base import EncoderMixin
from keras_clip_it.encoders.base import l2_normalize

POOLINGS = ("mean", "cls", "last", "pooled")
# Token lengths a batch is cut to: a handful of static shapes instead of always the full sequence length.
MIN_BUCKET = 16


@keras.saving.register_keras_serializable(package="keras_clip_it")
class TextEncoder(EncoderMixin, keras.Model):
    """Maps texts to one feature vector each, owning the tokenizer the backbone was trained with.

    The model takes the tokenizer's outputs (a dict of token ids and masks), so it trains inside
    `model.fit` on tokenised batches from `tf.data`; `tokenize` runs the tokenizer on the host and `embed`
    chains both, returning L2-normalised float32 rows. Batches are cut to the shortest of a few token
    lengths that holds every text, so short captions do not pay for the full sequence length.

    Args:
        backbone: a keras-hub text backbone taking the preprocessor's dict and returning a sequence
            (B, T, C) or a dict with "sequence_output" (and "pooled_output").
        preprocessor: a keras layer mapping a batch of strings to a dict with at least "token_ids" and
            "padding_mask" padded to its `sequence_length` (a keras-hub preprocessor or tokenizer+packer).
        pooling: "mean" averages the non-padding tokens (sentence-transformers), "cls" takes the first
            token, "last" the last non-padding token (CLIP's end-of-text token), "pooled" the
            backbone's own "pooled_output". With "cls" or "last", a backbone that has
            `call_at(inputs, positions)` (kci's `CLIPTextTower`) computes its last block at that token alone.
        prefix: text put before every input, such as e5's "query: ".

    Example:
    >>> encoder = TextEncoder.from_preset("all_minilm_l6_v2")  # doctest: +SKIP
    >>> encoder.embed(["a photo of a cat", "una foto di un gatto"]).shape  # doctest: +SKIP
    (2, 384)
    """

    def __init__(self, backbone, preprocessor, pooling="mean", prefix="", **kwargs):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        super().__init__(**kwargs)

        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Config ===
        self.pooling = pooling
        self.prefix = prefix

        # === Build ===
        symbolic = {name: keras.KerasTensor((None, None), dtype="int32") for name in self._input_names()}
        self._embedding_dim = int(self.call(symbolic).shape[-1])
        self.built = True

    @property
    def embedding_dim(self):
        """Size of the pooled features."""
        return self._embedding_dim

    @property
    def sequence_length(self):
        """The longest token sequence the preprocessor produces."""
        return self.preprocessor.sequence_length

    def _backbone_input_names(self):
        inputs = getattr(self.backbone, "input", None)
        return sorted(inputs) if isinstance(inputs, dict) else ["padding_mask", "token_ids"]

    def _input_names(self):
        # Pooling needs the padding mask even when the backbone does not (CLIP's causal text tower).
        return sorted(set(self._backbone_input_names()) | {"padding_mask"})

    def _pool(self, outputs, inputs):
        if isinstance(outputs, dict):
            if self.pooling == "pooled":
                return outputs["pooled_output"]
            outputs = outputs["sequence_output"]
        elif self.pooling == "pooled":
            raise ValueError("pooling='pooled' needs a backbone that returns a 'pooled_output'")
        if self.pooling == "cls":
            return outputs[:, 0]
        if self.pooling == "last":
            return ops.take_along_axis(outputs, self._last_positions(inputs)[:, None, None], axis=1)[:, 0]
        mask = ops.cast(inputs["padding_mask"], outputs.dtype)[..., None]
        total = ops.sum(outputs * mask, axis=1)
        return total / ops.maximum(ops.sum(mask, axis=1), ops.cast(1e-9, outputs.dtype))

    @staticmethod
    def _last_positions(inputs):
        """The index of each sequence's last non-padding token (0 for an empty one): int32 (batch,)."""
        return ops.maximum(ops.sum(ops.cast(inputs["padding_mask"], "int32"), axis=1) - 1, 0)

    def call(self, inputs, training=False):
        backbone_inputs = {name: inputs[name] for name in self._backbone_input_names()}
        mask = inputs["padding_mask"]
        if self.pooling in ("cls", "last") and hasattr(self.backbone, "call_at") and not keras.backend.is_keras_tensor(mask):
            # A tower that can compute its last block at the pooled token alone (CLIPTextTower);
            # symbolic inputs (shape inference) take the plain path, which gives the same shape.
            if self.pooling == "cls":
                positions = ops.zeros((ops.shape(mask)[0],), "int32")
            else:
                positions = self._last_positions(inputs)
            return self.backbone.call_at(backbone_inputs, positions, training=training)
        return self._pool(self.backbone(backbone_inputs, training=training), inputs)

    def tokenize(self, texts):
        """Tokenises strings into the backbone's inputs, a dict of int32 numpy arrays (N, sequence_length)."""
        texts = _check_texts(texts)
        outputs = self.preprocessor([self.prefix + text for text in texts])
        if isinstance(outputs, tuple):  # keras-hub preprocessors return (x, y, sample_weight) tuples
            outputs = outputs[0]
        return {name: np.asarray(outputs[name]).astype(np.int32) for name in self._input_names()}

    def embed(self, texts, batch_size=64, progress=None):
        """Embeds texts as L2-normalised float32 rows.

        Args:
            texts: a string or a list of strings.
            batch_size: texts run through the network at once.
            progress: show a progress bar (None: only for long runs).

        Returns:
            float32 array (N, embedding_dim).
        """
        texts = _check_texts(texts)

        def batch(start, stop):
            tokens = self.tokenize(texts[start:stop])
            return _trim(tokens, self.sequence_length)

        return l2_normalize(self._run_batches(len(texts), batch, batch_size, progress, "embedding texts"))

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """Loads a text encoder.

        Args:
            preset: an embedded preset ("all_minilm_l6_v2" for English, "multilingual_e5_small" for
                Italian and 90+ languages, both offline), a keras-hub preset name, "hf://org/name",
                "kaggle://...", or a local keras-hub or Hugging Face directory.
        """
        return presets.load_preset("text", preset, cls.from_keras_hub, **kwargs)

    @classmethod
    def from_keras_hub(cls, preset, **kwargs):
        """A keras-hub text backbone with the preset's tokenizer, as a `TextClassifierPreprocessor`."""
        import keras_hub

        backbone = keras_hub.models.Backbone.from_preset(preset)
        preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(preset)
        return cls(backbone=backbone, preprocessor=preprocessor, **kwargs)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.layers.serialize(self.backbone),
            "preprocessor": keras.layers.serialize(self.preprocessor),
            "pooling": self.pooling,
            "prefix": self.prefix,
        }

    @classmethod
    def from_config(cls, config):
        from keras_clip_it.encoders import text_preprocessor  # noqa: F401  the preprocessor may be one

        config = dict(config)
        presets.import_keras_modules()  # the backbone and tokenizer may be an architecture folder's classes
        config["backbone"] = keras.layers.deserialize(config["backbone"])
        config["preprocessor"] = keras.layers.deserialize(config["preprocessor"])
        return cls(**config)


def _check_texts(texts):
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {index} is a {type(text).__name__}, not a string: pass a list of str")
    return texts


def _trim(tokens, sequence_length):
    """Cuts padding columns beyond the smallest bucket (16, 32, 64, ...) that holds every text of the batch."""
    longest = int(tokens["padding_mask"].sum(axis=1).max(initial=1))
    length = MIN_BUCKET
    while length < longest:
        length *= 2
    length = min(length, sequence_length)
    return {name: value[:, :length] for name, value in tokens.items()}
