import keras
import numpy as np
import pytest

import keras_clip_it as kci
from tests.models.test_dual_encoder_towers import tiny_model
from tests.models.test_dual_encoder_towers import tiny_pairs


def dataset(model):
    images, captions = tiny_pairs(16)
    return kci.data.pairs(images, captions, model=model, batch_size=8, seed=0)


def snapshot(model):
    return {
        name: [np.array(w) for w in layer.weights]
        for name, layer in [
            ("image", model.image_encoder),
            ("text", model.text_encoder),
            ("heads", model.image_projection),
        ]
    }


class Recorder(keras.callbacks.Callback):
    """Weights at the end of every epoch, and the learning rate each epoch ran with."""

    def __init__(self):
        super().__init__()
        self.weights, self.learning_rates = [], []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(snapshot(self.model))
        self.learning_rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def changed(before, after, part):
    return any(not np.allclose(a, b) for a, b in zip(before[part], after[part]))


@pytest.mark.tf_parity
def test_schedule_in_one_fit_call():
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    start = snapshot(model)
    recorder = Recorder()
    model.fit(dataset(model), epochs=2, verbose=0, callbacks=[kci.callbacks.UnlockTowers(1, 1e-3), recorder])
    phase1, phase2 = recorder.weights
    # Phase 1: backbones frozen, heads trained.
    assert not changed(start, phase1, "image") and not changed(start, phase1, "text")
    assert changed(start, phase1, "heads")
    # Phase 2: everything trains, at the lower learning rate (the step was recompiled for it).
    assert changed(phase1, phase2, "image") and changed(phase1, phase2, "text")
    np.testing.assert_allclose(recorder.learning_rates, [1e-2, 1e-3], rtol=1e-6)
    assert model.locked_towers == {}


def test_schedule_in_two_fit_calls_with_default_learning_rate():
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    callback = kci.callbacks.UnlockTowers(unlock_epoch=1)
    start = snapshot(model)
    model.fit(dataset(model), epochs=1, verbose=0, callbacks=[callback])
    phase1 = snapshot(model)
    assert model.locked_towers == {"image": 0, "text": 0}
    assert not changed(start, phase1, "image") and changed(start, phase1, "heads")
    model.fit(dataset(model), initial_epoch=1, epochs=2, verbose=0, callbacks=[callback])
    assert changed(phase1, snapshot(model), "text")
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)), 1e-3, rtol=1e-6)


def test_partial_unlock_and_bad_arguments():
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    callback = kci.callbacks.UnlockTowers(unlock_epoch=0, learning_rate=1e-3, towers="image", unlocked_groups=1)
    model.fit(dataset(model), epochs=1, verbose=0, callbacks=[callback])
    assert model.locked_towers == {"image": 1}
    with pytest.raises(ValueError, match="towers"):
        kci.callbacks.UnlockTowers(towers=["audio"])


def test_two_callbacks_switching_in_the_same_epoch_divide_the_rate_once():
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    recorder = Recorder()
    callbacks = [kci.callbacks.UnlockTowers(1, towers="image"), kci.callbacks.UnlockTowers(1, towers="text"), recorder]
    model.fit(dataset(model), epochs=3, verbose=0, callbacks=callbacks)
    np.testing.assert_allclose(recorder.learning_rates, [1e-2, 1e-3, 1e-3], rtol=1e-6)
    assert model.locked_towers == {}
