"""Encoder fingerprints: cached while the weights provably stand still, recomputed after any change."""

import hashlib
import json
import threading

import keras
import numpy as np
import pytest

from keras_clip_it.encoders import base
from tests.encoders.test_image_encoder import images
from tests.encoders.test_image_encoder import tiny_encoder

pytestmark = pytest.mark.tf_parity


@pytest.fixture
def weight_reads(monkeypatch):
    """Counts the weights a fingerprint reads (every read goes through `base._weight_bytes`)."""
    reads = []
    original = base._weight_bytes

    def counted(weight):
        reads.append(weight.path)
        return original(weight)

    monkeypatch.setattr(base, "_weight_bytes", counted)
    return reads


def reference_digest(encoder):
    """The fingerprint's definition, computed from scratch."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(encoder).__name__.encode())
    digest.update(json.dumps(base._strip_names(encoder.get_config()), sort_keys=True, default=str).encode())
    for weight in encoder.weights:
        value = np.ascontiguousarray(np.asarray(weight.numpy()))
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def train_one_step(encoder):
    encoder.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    pixels = encoder.preprocess(images(4)).astype("float32")
    encoder.fit(pixels, np.ones((4, encoder.embedding_dim), "float32"), epochs=1, batch_size=4, verbose=0)


def test_second_read_reads_no_weight_and_embedding_keeps_it(weight_reads):
    encoder = tiny_encoder()
    encoder.trainable = False  # on backends whose variables change in place, only a frozen encoder caches
    first = encoder.fingerprint
    assert first == reference_digest(encoder)
    assert len(weight_reads) == len(encoder.weights) > 0
    weight_reads.clear()
    assert encoder.fingerprint == first
    encoder.embed(images(3), batch_size=2)  # predictions re-wrap the weights on JAX, unchanged
    assert encoder.fingerprint == first
    assert weight_reads == []


def test_changes_after_set_weights_and_load_weights(weight_reads, tmp_path):
    encoder, other = tiny_encoder(), tiny_encoder()
    encoder.trainable = other.trainable = False
    first = encoder.fingerprint
    weights = encoder.get_weights()
    weights[0] = weights[0] + 1.0
    encoder.set_weights(weights)
    changed = encoder.fingerprint
    assert changed != first and changed == reference_digest(encoder)
    assert encoder.fingerprint == changed  # cached again

    path = str(tmp_path / "other.weights.h5")
    other.save_weights(path)
    encoder.load_weights(path)
    loaded = encoder.fingerprint
    assert loaded not in (first, changed) and loaded == other.fingerprint == reference_digest(encoder)
    weight_reads.clear()
    assert encoder.fingerprint == loaded and weight_reads == []


def test_changes_after_one_training_step():
    encoder = tiny_encoder()
    before = encoder.fingerprint
    train_one_step(encoder)
    after = encoder.fingerprint
    assert after != before and after == reference_digest(encoder)


def test_freezing_alone_keeps_it():
    # ASIF, LiT and the server freeze encoders: embeddings stored for the unfrozen encoder must still match.
    encoder = tiny_encoder()
    before = encoder.fingerprint
    encoder.trainable = False
    assert encoder.fingerprint == before
    encoder.trainable = True
    assert encoder.fingerprint == before


def test_unfreezing_training_and_freezing_again_changes_it():
    encoder = tiny_encoder()
    encoder.trainable = False
    before = encoder.fingerprint
    encoder.trainable = True
    train_one_step(encoder)
    encoder.trainable = False
    assert encoder.fingerprint != before
    assert encoder.fingerprint == reference_digest(encoder)


def test_stable_while_another_thread_predicts(weight_reads):
    encoder = tiny_encoder()
    encoder.trainable = False
    expected = encoder.fingerprint
    batch = images(2)
    errors, seen, done = [], [], threading.Event()

    def predict():
        try:
            for _ in range(20):
                encoder.embed(batch)
        except Exception as error:  # reported below with the test's failure
            errors.append(error)
        finally:
            done.set()

    thread = threading.Thread(target=predict)
    weight_reads.clear()
    thread.start()
    while not done.is_set():
        seen.append(encoder.fingerprint)
    thread.join()
    assert not errors, errors
    assert set(seen) == {expected} and weight_reads == []
