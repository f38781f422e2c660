"""Contrastive losses for dual encoders, with the cross-device gathering inside them.

A contrastive loss needs every image of the batch against every caption: the negatives are the rest of
the batch. On many devices the batch is split, so, as in open_clip's `ClipLoss`, the gathering of
embeddings across devices lives in the loss and not in the training loop:

- JAX (`keras.distribution.DataParallel`): the step is one program over the global batch, sharded by
  XLA, so the loss already sees every embedding and needs nothing more.
- TensorFlow (`tf.distribute.MirroredStrategy`, `TPUStrategy`): each replica runs the step on its own
  slice. The loss all-gathers the embeddings of every replica (TF's `all_gather` sums the gradients that
  flow back to each replica's own slice) and scores the local rows against the global columns. Keras
  divides each replica's loss by the number of replicas and sums the gradients, so the update equals the
  single-device update on the global batch.

Both losses take `y_pred` as the dict a `DualEncoder` builds in `compute_loss`: L2-normalised
"image_embeddings" and "text_embeddings" (B, D), the scalar "logit_scale" and, for the sigmoid loss, the
scalar "logit_bias". Labels are implicit (row i matches column i), so `y_true` is ignored. Keras casts
`y_pred` to the loss dtype (float32 unless set), which keeps the loss in float32 under mixed precision.
"""

import keras
from keras import ops


def _replica_context():
    """The TensorFlow replica context when a step runs on several replicas, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def gather_batch(*embeddings):
    """Every device's rows of `embeddings`, in global-batch order, and where this device's rows start.

    Only the tensors a loss uses should be gathered: each one is a collective operation, forwards and
    backwards, on every step.

    Args:
        *embeddings: (b, D) tensors computed on this device.

    Returns:
        A tuple of the (B, D) gathered tensors followed by the int index of this device's first row in
        the global batch (the inputs themselves and 0 when nothing is distributed).
    """
    context = _replica_context()
    if context is None:
        return (*embeddings, 0)
    import tensorflow as tf

    gathered = context.all_gather(list(embeddings), axis=0)
    sizes = context.all_gather(tf.shape(embeddings[0])[:1], axis=0)
    offset = tf.reduce_sum(sizes[: context.replica_id_in_sync_group])
    return (*gathered, offset)


def _unpack(y_pred):
    try:
        return y_pred["image_embeddings"], y_pred["text_embeddings"], y_pred["logit_scale"]
    except (KeyError, TypeError):
        raise ValueError(
            "contrastive losses take y_pred as a dict with 'image_embeddings', 'text_embeddings' and "
            "'logit_scale', as DualEncoder.compute_loss builds it; compile a DualEncoder with this loss "
            f"instead of passing it another model's outputs (got {type(y_pred).__name__})"
        ) from None


@keras.saving.register_keras_serializable(package="keras_clip_it")
class ContrastiveLoss(keras.losses.Loss):
    """Symmetric InfoNCE (CLIP's loss): each image picks its caption among the batch, and vice versa.

    The logits are `logit_scale * images @ texts.T`; the loss of pair i is the mean of the cross entropy
    of row i (image to text) and of column i (text to image) against the diagonal. Label smoothing spreads
    `label_smoothing` of the target mass over the whole batch, which helps when captions of different
    images are near duplicates (emoji, product photos).

    Args:
        label_smoothing: float in [0, 1).
        reduction: Keras loss reduction; per-pair losses are averaged by default.
        name: loss name.
        dtype: dtype of the computation (float32 by default, also under mixed precision).

    Example:
    >>> model.compile(optimizer="adamw", loss=ContrastiveLoss(label_smoothing=0.1))  # doctest: +SKIP
    """

    def __init__(self, label_smoothing=0.0, reduction="sum_over_batch_size", name="contrastive_loss", dtype=None):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        del y_true  # row i matches column i
        images, texts, scale = _unpack(y_pred)
        all_images, all_texts, offset = gather_batch(images, texts)
        image_logits = scale * ops.matmul(images, ops.transpose(all_texts))  # (b, B)
        text_logits = scale * ops.matmul(texts, ops.transpose(all_images))  # (b, B)
        labels = ops.arange(ops.shape(images)[0]) + offset
        targets = ops.one_hot(labels, ops.shape(all_texts)[0], dtype=image_logits.dtype)
        if self.label_smoothing:
            count = ops.cast(ops.shape(all_texts)[0], targets.dtype)
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / count
        image_to_text = -ops.sum(targets * ops.log_softmax(image_logits, axis=-1), axis=-1)
        text_to_image = -ops.sum(targets * ops.log_softmax(text_logits, axis=-1), axis=-1)
        return (image_to_text + text_to_image) / 2.0

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="keras_clip_it")
class SigmoidLoss(keras.losses.Loss):
    """SigLIP's pairwise sigmoid loss: every (image, caption) pair is its own binary decision.

    The logits are `logit_scale * images @ texts.T + logit_bias`; matching pairs are positives and all
    others negatives, and the loss of image i sums the log-sigmoid terms of its row (SigLIP normalises by
    the batch size, not by the number of pairs). No softmax couples the batch, so it works with small
    batches. The learnable bias lives in the model: build `DualEncoder(..., logit_bias=-10.0)`.

    Args:
        reduction: Keras loss reduction; per-image losses are averaged by default.
        name: loss name.
        dtype: dtype of the computation (float32 by default, also under mixed precision).

    Example:
    >>> model = DualEncoder(img, txt, logit_scale=10.0, logit_bias=-10.0)  # doctest: +SKIP
    >>> model.compile(optimizer="adamw", loss=SigmoidLoss())  # doctest: +SKIP
    """

    def __init__(self, reduction="sum_over_batch_size", name="sigmoid_loss", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        del y_true
        images, texts, scale = _unpack(y_pred)
        if "logit_bias" not in y_pred:
            raise ValueError(
                "SigmoidLoss needs a learnable bias: build the model with DualEncoder(..., logit_bias=-10.0)"
            )
        all_texts, offset = gather_batch(texts)  # each device scores its own images against every caption
        logits = scale * ops.matmul(images, ops.transpose(all_texts)) + y_pred["logit_bias"]
        labels = ops.arange(ops.shape(images)[0]) + offset
        signs = 2.0 * ops.one_hot(labels, ops.shape(all_texts)[0], dtype=logits.dtype) - 1.0
        return -ops.sum(ops.log_sigmoid(signs * logits), axis=-1)
