"""CLIP-style dual encoders: two towers, linear projections into one space, trained with `model.fit`."""

import math
import os
from contextlib import nullcontext

import keras
import numpy as np
from keras import ops

from keras_clip_it.data.images import as_image_batch
from keras_clip_it.data.pairs import with_fit_options
from keras_clip_it.encoders.base import padded_batch_size
from keras_clip_it.losses import ContrastiveLoss
from keras_clip_it.losses import SigmoidLoss
from keras_clip_it.losses import gather_batch

TOWERS = ("image", "text")
# Never decayed: shrinking the temperature or the sigmoid bias towards 0 is not regularisation.
NO_WEIGHT_DECAY = ["logit_scale", "logit_bias"]


class _MaxValue(keras.constraints.Constraint):
    """Keeps a scalar at or below `limit` after each optimizer step (open_clip's logit-scale clamp).

    Clamping the variable, not its use in the forward pass, keeps the gradient alive at the limit, so
    the temperature can move back down.
    """

    def __init__(self, limit):
        self.limit = float(limit)

    def __call__(self, value):
        return ops.minimum(value, ops.cast(self.limit, value.dtype))

    def get_config(self):
        return {"limit": self.limit}


def layer_groups(model):
    """The weight-bearing parts of a backbone from input to output: what `unlocked_groups` counts.

    A part is a top-level layer of the backbone with weights; a layer that only holds a run of repeated
    blocks (keras-hub's `ViTEncoder`) is opened up, so that for ViT and BERT alike the groups are the
    embeddings, each transformer block in order, then the final norm or pooler, as in open_clip.
    """
    children = getattr(model, "layers", None)
    if children is None:
        children = list(model._flatten_layers(include_self=False, recursive=False))
    groups = []
    for layer in children:
        if not layer.weights:
            continue
        inner = [child for child in layer._flatten_layers(include_self=False, recursive=False) if child.weights]
        # Blocks are composite layers of one type repeated; repeated plain layers (the dense layers of
        # one transformer block) do not make a container.
        blocks = [type(child) for child in inner if any(c.weights for c in child._flatten_layers(include_self=False))]
        holds_only_children = sum(len(child.weights) for child in inner) == len(layer.weights)
        if holds_only_children and len(set(blocks)) < len(blocks):
            groups.extend(inner)
        else:
            groups.append(layer)
    return groups


def set_trainable(layer, value):
    """Sets `trainable` on `layer` and on every layer inside it, whatever their flags were.

    `layer.trainable = value` alone is not enough on TensorFlow: the attribute tracking there skips the
    assignment when the layer's own flag already equals `value`, so blocks frozen inside a trainable
    layer would stay frozen (unlocking the top blocks of a locked tower would do nothing).
    """
    for sub in layer._flatten_layers(include_self=True, recursive=True):
        sub.trainable = value


@keras.saving.register_keras_serializable(package="keras_clip_it")
class DualEncoder(keras.Model):
    """An image tower and a text tower projected into one space, trained contrastively with `fit`.

    This is CLIP's architecture (and LiT's, with a locked image tower): each tower's pooled features go
    through a linear projection without bias and are L2-normalised; similarities are scaled by a
    temperature that is either learned (initialised at 1/0.07, kept at or below 100, as open_clip) or
    fixed (CLIP-Italian used 20). The model takes `{"images": uint8 pixels, "texts": token dict}`, the
    batches `kci.data.pairs` yields, and returns `{"image_embeddings", "text_embeddings"}`; either key
    alone also works. `compile()` defaults to `ContrastiveLoss` and AdamW, so `fit(pairs)` needs no labels,
    and each step runs one forward pass.

    Args:
        image_encoder: a `kci.ImageEncoder`.
        text_encoder: a `kci.TextEncoder`.
        projection_dim: size of the shared embedding space.
        logit_scale: initial temperature multiplier of the similarities.
        learn_logit_scale: learn the temperature (True) or keep it fixed (False).
        max_logit_scale: upper limit of a learned temperature.
        logit_bias: initial value of a learned bias added to the logits, needed by `SigmoidLoss`
            (SigLIP starts at -10 with `logit_scale=10`); None for no bias.

    Example:
    >>> img = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")  # doctest: +SKIP
    >>> txt = kci.TextEncoder.from_preset("multilingual_e5_small")  # doctest: +SKIP
    >>> model = kci.DualEncoder(img, txt, projection_dim=256)  # doctest: +SKIP
    >>> model.lock("image")  # LiT  # doctest: +SKIP
    >>> model.compile()  # doctest: +SKIP
    >>> model.fit(kci.data.pairs(images, captions, model=model, batch_size=64), epochs=3)  # doctest: +SKIP
    >>> model.encode_texts(["un gatto"]).shape  # doctest: +SKIP
    (1, 256)
    """

    def __init__(
        self,
        image_encoder,
        text_encoder,
        projection_dim=512,
        logit_scale=1 / 0.07,
        learn_logit_scale=True,
        max_logit_scale=100.0,
        logit_bias=None,
        **kwargs,
    ):
        if not 0 < logit_scale <= max_logit_scale:
            raise ValueError(f"logit_scale must be in (0, max_logit_scale={max_logit_scale}], got {logit_scale}")
        super().__init__(**kwargs)

        # === Layers ===
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_projection = keras.layers.Dense(projection_dim, use_bias=False, name="image_projection")
        self.text_projection = keras.layers.Dense(projection_dim, use_bias=False, name="text_projection")

        # === Config ===
        self.projection_dim = int(projection_dim)
        self.initial_logit_scale = float(logit_scale)
        self.learn_logit_scale = bool(learn_logit_scale)
        self.max_logit_scale = float(max_logit_scale)
        self.initial_logit_bias = None if logit_bias is None else float(logit_bias)
        self._locked = {}  # tower -> number of top groups left trainable (0: the whole tower is frozen)

        # === Weights ===
        self.image_projection.build((None, image_encoder.embedding_dim))
        self.text_projection.build((None, text_encoder.embedding_dim))
        # keras.initializers.Constant, not a Python float: a float initializer makes JAX retrace at step 2.
        self.log_logit_scale = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(math.log(logit_scale)),
            trainable=self.learn_logit_scale,
            constraint=_MaxValue(math.log(max_logit_scale)),
            dtype="float32",
            name="logit_scale",
        )
        self.logit_bias = None
        if logit_bias is not None:
            self.logit_bias = self.add_weight(
                shape=(),
                initializer=keras.initializers.Constant(float(logit_bias)),
                dtype="float32",
                name="logit_bias",
            )
        self.image_to_text_top1 = keras.metrics.Mean(name="image_to_text_top1")
        self.text_to_image_top1 = keras.metrics.Mean(name="text_to_image_top1")
        self.contrastive_loss = None
        self.built = True

    # === Forward pass ===

    def _tower_training(self, tower, training):
        # A fully locked tower runs in inference mode: no dropout, batch norm on its moving statistics.
        return bool(training) and self._locked.get(tower) != 0

    def _project(self, features, projection):
        embeddings = ops.cast(projection(features), "float32")
        return embeddings / ops.maximum(ops.norm(embeddings, axis=-1, keepdims=True), 1e-12)

    def call(self, inputs, training=False):
        if not isinstance(inputs, dict) or not ({"images", "texts"} & set(inputs)):
            raise ValueError(
                "DualEncoder takes a dict with 'images' (uint8 pixels) and/or 'texts' (the text encoder's "
                "token dict), as kci.data.pairs yields; for raw images or strings use encode_images / "
                "encode_texts"
            )
        outputs = {}
        if "images" in inputs:
            features = self.image_encoder(inputs["images"], training=self._tower_training("image", training))
            outputs["image_embeddings"] = self._project(features, self.image_projection)
        if "texts" in inputs:
            features = self.text_encoder(inputs["texts"], training=self._tower_training("text", training))
            outputs["text_embeddings"] = self._project(features, self.text_projection)
        return outputs

    @property
    def logit_scale(self):
        """The current temperature multiplier, a float32 scalar tensor."""
        return ops.exp(ops.cast(self.log_logit_scale, "float32"))

    # === Training ===

    def compile(self, optimizer=None, loss=None, **kwargs):
        """Configures training with defaults that need no labels.

        Args:
            optimizer: a Keras optimizer or its name; default AdamW(learning_rate=1e-4, weight_decay=0.1).
                The temperature and bias are never weight-decayed.
            loss: `ContrastiveLoss()` (default) or `SigmoidLoss()` (needs `logit_bias`).
            **kwargs: passed to `keras.Model.compile` (jit_compile, steps_per_execution, ...); `metrics`
                is not accepted: the in-batch image_to_text_top1 and text_to_image_top1 are reported.
        """
        if kwargs.get("metrics") or kwargs.get("weighted_metrics"):
            raise ValueError(
                "DualEncoder.compile reports image_to_text_top1 and text_to_image_top1 itself; label-based "
                "metrics do not apply to contrastive training: evaluate retrieval with kci.metrics instead"
            )
        kwargs.pop("metrics", None)
        kwargs.pop("weighted_metrics", None)
        kwargs.pop("loss_weights", None)
        if optimizer is None:
            optimizer = keras.optimizers.AdamW(learning_rate=1e-4, weight_decay=0.1)
        optimizer = keras.optimizers.get(optimizer)
        _exclude_from_decay(optimizer)
        loss = ContrastiveLoss() if loss is None else keras.losses.get(loss)
        if isinstance(loss, SigmoidLoss) and self.logit_bias is None:
            raise ValueError("SigmoidLoss needs a learned bias: build the model with DualEncoder(..., logit_bias=-10.0)")
        self.contrastive_loss = loss
        super().compile(optimizer=optimizer, loss=None, **kwargs)
        # Keras records loss=None; record the real loss so a reloaded .keras model compiles the same way.
        self._compile_config.config["loss"] = loss

    def fit(self, x=None, *args, **kwargs):
        """`keras.Model.fit`, with tf.data's autotuning thread off in tf.data inputs (`with_fit_options`).

        Why: on TensorFlow, Keras deletes the input's iterator when `fit` ends, and with autotuning on that
        can wait for the autotuning thread's next wake-up, which comes ever later as the iterator ages:
        up to as long again as the training itself (docs/training.md, "TensorFlow on CPU"). Pipelines
        from `kci.data.pairs` already have it off; a pipeline whose options set `autotune.enabled` is
        left as it is.

        Args:
            x: the training data, as `keras.Model.fit` takes it (usually `kci.data.pairs(...)`).
            *args: `keras.Model.fit`'s other arguments, in its order.
            **kwargs: `keras.Model.fit`'s other arguments; a tf.data `validation_data` gets the same options.

        Example:
        >>> model.fit(kci.data.pairs(images, captions, model=model, batch_size=64), epochs=3)  # doctest: +SKIP
        """
        args = list(args)
        if len(args) > 6:  # validation_data passed by position: (y, batch_size, ..., validation_data)
            args[6] = with_fit_options(args[6])
        if "validation_data" in kwargs:
            kwargs["validation_data"] = with_fit_options(kwargs["validation_data"])
        return super().fit(with_fit_options(x), *args, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        """`keras.Model.evaluate`, with tf.data's autotuning thread off in a tf.data `x` (see `fit`)."""
        return super().evaluate(with_fit_options(x), *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        """`keras.Model.predict`, with tf.data's autotuning thread off in a tf.data `x` (see `fit`)."""
        return super().predict(with_fit_options(x), *args, **kwargs)

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(config))
        # Optimizer variables must exist before a saved optimizer state can be loaded into them.
        self.optimizer.build(self.trainable_variables)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if self.contrastive_loss is None:
            raise ValueError("call model.compile() before training or evaluating the model")
        if "image_embeddings" not in y_pred or "text_embeddings" not in y_pred:
            raise ValueError("training batches need both 'images' and 'texts': build them with kci.data.pairs")
        scores = {
            "image_embeddings": y_pred["image_embeddings"],
            "text_embeddings": y_pred["text_embeddings"],
            "logit_scale": self.logit_scale,
        }
        if self.logit_bias is not None:
            scores["logit_bias"] = ops.cast(self.logit_bias, "float32")
        # No labels: row i matches column i. An empty dict passes through Keras' tensor conversion.
        loss = self.contrastive_loss({}, scores)
        for extra in self.losses:
            loss = loss + self._aggregate_additional_loss(extra)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Candidates are the global batch, as in the loss: the same figures on one device or many.
        images, texts = y_pred["image_embeddings"], y_pred["text_embeddings"]
        all_images, all_texts, offset = gather_batch(images, texts)
        labels = ops.arange(ops.shape(images)[0]) + offset
        for metric, queries, candidates in (
            (self.image_to_text_top1, images, all_texts),
            (self.text_to_image_top1, texts, all_images),
        ):
            best = ops.argmax(ops.matmul(queries, ops.transpose(candidates)), axis=-1)
            metric.update_state(ops.mean(ops.cast(ops.equal(best, ops.cast(labels, best.dtype)), "float32")))
        return self.get_metrics_result()

    # === Locking ===

    def _tower(self, tower):
        if tower not in TOWERS:
            raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")
        return self.image_encoder if tower == "image" else self.text_encoder

    @property
    def locked_towers(self):
        """{tower: number of top groups left trainable} for the locked towers (0: fully frozen)."""
        return dict(self._locked)

    def lock(self, tower, unlocked_groups=0):
        """Freezes a tower, optionally leaving its top `unlocked_groups` groups trainable (LiT).

        Frozen layers stop updating and their batch norms run on their moving statistics; a fully
        locked tower also runs without dropout. The projection heads stay trainable. Safe to call
        again with another `unlocked_groups`, and during `fit` (from a callback): the training step is
        rebuilt and, because the optimizer only knows the variables it was built for, a compiled model
        gets a fresh optimizer of the same configuration.

        Args:
            tower: "image" or "text".
            unlocked_groups: how many of the backbone's last groups (transformer blocks, final norm, ...;
                see `layer_groups`) stay trainable.
        """
        encoder = self._tower(tower)
        groups = layer_groups(encoder.backbone)
        if not 0 <= unlocked_groups <= len(groups):
            raise ValueError(f"unlocked_groups must be between 0 and {len(groups)} for the {tower} tower")
        if self._locked.get(tower) == unlocked_groups:
            return
        self._sync_training_state()
        if unlocked_groups == 0:
            set_trainable(encoder, False)
        else:
            set_trainable(encoder, True)
            for layer in encoder._flatten_layers(include_self=False, recursive=False):
                if layer is not encoder.backbone:
                    set_trainable(layer, False)
            for group in groups[: len(groups) - unlocked_groups]:
                set_trainable(group, False)
        self._locked[tower] = int(unlocked_groups)
        self._refresh_training()

    def unlock(self, tower):
        """Makes a locked tower fully trainable again (the second phase of the CLIP-Italian schedule)."""
        encoder = self._tower(tower)
        if tower not in self._locked:
            return
        self._sync_training_state()
        set_trainable(encoder, True)
        del self._locked[tower]
        self._refresh_training()

    def _sync_training_state(self):
        # Mid-fit on JAX the latest values live in the trainer's state, keyed by the current list of
        # trainable variables: write them back before that list changes.
        if keras.backend.backend() == "jax" and hasattr(self, "jax_state_sync"):
            self.jax_state_sync()

    def _refresh_training(self):
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and optimizer.built:
            self.optimizer = self._fresh_optimizer()
        if self.train_function is not None:
            self.make_train_function(force=True)

    def _fresh_optimizer(self, learning_rate=None):
        """A new optimizer with the current one's configuration, built for today's trainable variables."""
        old = self.optimizer
        config = old.get_config()
        if learning_rate is not None:
            config["learning_rate"] = float(learning_rate)
        # Under tf.distribute, optimizer variables must be created in the strategy's scope.
        scope = self.distribute_strategy.scope() if keras.backend.backend() == "tensorflow" else nullcontext()
        with scope:
            optimizer = type(old).from_config(config)
            _exclude_from_decay(optimizer)
            optimizer.build(self.trainable_variables)
        return optimizer

    def set_learning_rate(self, learning_rate):
        """Sets a constant learning rate, replacing a schedule if there is one; safe during `fit`.

        With a schedule the optimizer is replaced by one of the same configuration at the constant rate
        (its slots start afresh) and a running `fit` rebuilds its training step, as after `lock`; a
        constant rate is simply assigned. `kci.callbacks.UnlockTowers` calls it when phase 2 begins.

        Args:
            learning_rate: float, the new learning rate.

        Example:
        >>> model.compile(optimizer=keras.optimizers.AdamW(1e-3))  # doctest: +SKIP
        >>> model.set_learning_rate(1e-5)  # doctest: +SKIP
        """
        if getattr(self, "optimizer", None) is None:
            raise ValueError("set_learning_rate needs an optimizer: call model.compile(optimizer=...) first")
        if isinstance(self.optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            self._sync_training_state()
            self.optimizer = self._fresh_optimizer(learning_rate)
            if self.train_function is not None:
                self.make_train_function(force=True)
        else:
            self.optimizer.learning_rate = float(learning_rate)

    # === Inference ===

    def encode_images(self, images, batch_size=32):
        """L2-normalised float32 embeddings (N, projection_dim) of images of any kind the tower accepts."""
        items = as_image_batch(images)
        return self._encode(
            len(items), lambda start, stop: self.image_encoder.preprocess(items[start:stop]), "images", batch_size
        )

    def encode_texts(self, texts, batch_size=64):
        """L2-normalised float32 embeddings (N, projection_dim) of strings."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self._encode(
            len(texts), lambda start, stop: self.text_encoder.tokenize(texts[start:stop]), "texts", batch_size
        )

    def _encode(self, count, make_batch, key, batch_size):
        size = padded_batch_size(count, batch_size)
        outputs = []
        for start in range(0, count, size):
            stop = min(start + size, count)
            batch = _pad_rows(make_batch(start, stop), size)  # static shapes: one compiled function
            result = self.predict_on_batch({key: batch})
            outputs.append(np.asarray(result[key[:-1] + "_embeddings"], np.float32)[: stop - start])
        if not outputs:
            return np.zeros((0, self.projection_dim), np.float32)
        return np.concatenate(outputs)

    # === Saving ===

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """Loads a trained dual encoder from a `.keras` file, a local directory or "hf://org/name".

        Args:
            preset: a `.keras` file, a directory holding `model.keras`, a local Hugging Face
                directory whose model type has a registered converter ("clip",
                "vision-text-dual-encoder"), or "hf://org/name" (downloaded once when online).
            **kwargs: passed to the converter.
        """
        from keras_clip_it.encoders import presets

        local = presets.resolve(preset)  # "hf://org/name": the downloaded folder (fails fast offline)
        local = local[len("file://"):] if local.startswith("file://") else local
        if local.endswith(".keras") and os.path.isfile(local):
            return keras.saving.load_model(local)
        if os.path.isdir(local):
            if os.path.isfile(os.path.join(local, "model.keras")):
                return keras.saving.load_model(os.path.join(local, "model.keras"))
            config = presets.load_config(local)
            if config is not None:
                source = os.path.join(local, "config.json")
                return presets.converter("dual", config.get("model_type"), source)(local, **kwargs)
        raise ValueError(
            f"unknown DualEncoder preset {preset!r}: pass a .keras file or a local directory (with model.keras "
            "or a Hugging Face checkpoint), or build a model from towers with "
            "DualEncoder(ImageEncoder.from_preset(...), TextEncoder.from_preset(...))"
        )

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "image_encoder": keras.layers.serialize(self.image_encoder),
            "text_encoder": keras.layers.serialize(self.text_encoder),
            "projection_dim": self.projection_dim,
            "logit_scale": self.initial_logit_scale,
            "learn_logit_scale": self.learn_logit_scale,
            "max_logit_scale": self.max_logit_scale,
            "logit_bias": self.initial_logit_bias,
            "locked_towers": dict(self._locked),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["image_encoder"] = keras.layers.deserialize(config["image_encoder"])
        config["text_encoder"] = keras.layers.deserialize(config["text_encoder"])
        locked = config.pop("locked_towers", {}) or {}
        model = cls(**config)
        for tower, unlocked_groups in locked.items():
            model.lock(tower, unlocked_groups)
        return model


def _exclude_from_decay(optimizer):
    if getattr(optimizer, "weight_decay", None) and hasattr(optimizer, "exclude_from_weight_decay"):
        optimizer.exclude_from_weight_decay(var_names=NO_WEIGHT_DECAY)


def _pad_rows(batch, size):
    if isinstance(batch, dict):
        return {key: _pad_rows(value, size) for key, value in batch.items()}
    pad = [(0, size - batch.shape[0])] + [(0, 0)] * (batch.ndim - 1)
    return np.pad(batch, pad)
