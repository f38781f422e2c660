"""What image and text encoders share: batched embedding with static shapes, normalisation, fingerprints."""

import hashlib
import json

import numpy as np


def l2_normalize(array, axis=-1):
    """Returns float32 `array` with unit L2 norm along `axis` (zero rows stay zero)."""
    array = np.asarray(array, dtype=np.float32)
    norms = np.linalg.norm(array, axis=axis, keepdims=True)
    return array / np.maximum(norms, 1e-12)


def padded_batch_size(count, batch_size):
    """The static batch size used for `count` items: a power of two up to `batch_size`.

    Padding every batch to one of a few sizes keeps compiled shapes static (no JAX retrace, no new TF
    graph per call) without running a full batch of padding for a single query.
    """
    size = 1
    while size < count and size < batch_size:
        size *= 2
    return min(size, batch_size)


def _strip_names(value):
    if isinstance(value, dict):
        return {key: _strip_names(item) for key, item in value.items() if key != "name"}
    if isinstance(value, (list, tuple)):
        return [_strip_names(item) for item in value]
    return value


class EncoderMixin:
    """Batching, fingerprinting and progress reporting for `ImageEncoder` and `TextEncoder`."""

    @property
    def fingerprint(self):
        """A stable hex digest of the encoder's architecture and weights.

        Collections store embeddings per fingerprint, so embeddings from different encoders (or from the
        same architecture with other weights, e.g. after fine-tuning) are never mixed. Layer names are
        left out: they change between instances without changing what the encoder computes.
        """
        digest = hashlib.blake2b(digest_size=16)
        digest.update(type(self).__name__.encode())
        config = _strip_names(self.get_config())
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for weight in self.weights:
            value = np.ascontiguousarray(np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight))
            digest.update(str(value.shape).encode())
            digest.update(value.tobytes())
        return digest.hexdigest()

    def _run_batches(self, count, make_batch, batch_size, progress, desc):
        """Runs `predict_on_batch` over `count` items in static-shaped batches and returns float32 rows.

        Args:
            count: number of items.
            make_batch: callable (start, stop) -> model inputs for those items (array or dict of arrays).
            batch_size: largest batch run at once.
            progress: True/False, or None to show a bar only when there are more than 8 batches.
            desc: label of the progress bar.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        size = padded_batch_size(count, batch_size)
        starts = range(0, count, size)
        if progress is None:
            progress = len(starts) > 8
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, unit="batch")
        outputs = []
        for start in starts:
            stop = min(start + size, count)
            batch = make_batch(start, stop)
            real = stop - start
            if real < size:
                batch = _pad_rows(batch, size)
            result = self.predict_on_batch(batch)
            outputs.append(np.asarray(result, dtype=np.float32)[:real])
        if not outputs:
            return np.zeros((0, self.embedding_dim), np.float32)
        return np.concatenate(outputs)


def _pad_rows(batch, size):
    if isinstance(batch, dict):
        return {key: _pad_rows(value, size) for key, value in batch.items()}
    pad = [(0, size - batch.shape[0])] + [(0, 0)] * (batch.ndim - 1)
    return np.pad(batch, pad)
