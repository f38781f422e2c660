"""Training callbacks for dual encoders: the CLIP-Italian schedule of locking and unlocking towers."""

import math
import weakref

import keras

from keras_clip_it.models.dual_encoder import TOWERS

# The phase-2 learning rate each model was switched to, so that several UnlockTowers (one per tower)
# switching one model divide its phase-1 rate once; it lives as long as the model, across `fit` calls.
_PHASE2_LEARNING_RATES = weakref.WeakKeyDictionary()


class UnlockTowers(keras.callbacks.Callback):
    """Trains the projection heads on frozen towers first, then everything at a lower learning rate.

    CLIP-Italian's schedule: with pretrained towers and randomly initialised heads, the first updates
    are large and would wreck the pretrained features, so phase 1 freezes the backbones and trains only
    the heads; from `unlock_epoch` on (phase 2) the towers are unlocked and the whole model trains at a
    lower learning rate. The switch happens at the start of an epoch, so it works in one `fit` call, or in
    two (`fit(epochs=k)` then `fit(initial_epoch=k, epochs=n)` with the callback in both). The model
    rebuilds its training step and gives the optimizer the new set of trainable variables on both
    backends (a compiled step keeps the variable list it was traced with).

    Args:
        unlock_epoch: first epoch (0-based) of phase 2.
        learning_rate: the phase-2 learning rate; default a tenth of the phase-1 rate (divided once, also when
            several UnlockTowers, e.g. one per tower, switch the same model).
        towers: the towers to lock in phase 1 and unlock in phase 2.
        unlocked_groups: in phase 2, leave only the top groups of each tower trainable (None: all).

    Example:
    >>> model.compile(optimizer=keras.optimizers.AdamW(1e-3))  # doctest: +SKIP
    >>> model.fit(pairs, epochs=6, callbacks=[kci.callbacks.UnlockTowers(unlock_epoch=2, learning_rate=1e-5)])  # doctest: +SKIP
    """

    def __init__(self, unlock_epoch=1, learning_rate=None, towers=TOWERS, unlocked_groups=None):
        super().__init__()
        if unlock_epoch < 0:
            raise ValueError(f"unlock_epoch must be >= 0, got {unlock_epoch}")
        towers = (towers,) if isinstance(towers, str) else tuple(towers)
        for tower in towers:
            if tower not in TOWERS:
                raise ValueError(f"towers must name 'image' and/or 'text', got {tower!r}")
        self.unlock_epoch = int(unlock_epoch)
        self.learning_rate = None if learning_rate is None else float(learning_rate)
        self.towers = towers
        self.unlocked_groups = None if unlocked_groups is None else int(unlocked_groups)

    def on_epoch_begin(self, epoch, logs=None):
        model = self.model
        if not hasattr(model, "lock"):
            raise TypeError(f"UnlockTowers works with a kci.DualEncoder, not a {type(model).__name__}")
        if epoch < self.unlock_epoch:
            for tower in self.towers:
                model.lock(tower)
            return
        if all(model.locked_towers.get(tower) == self.unlocked_groups for tower in self.towers):
            return
        current = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        learning_rate = self.learning_rate
        if learning_rate is None:
            # Another UnlockTowers (say one per tower) may have switched this model to phase 2 already,
            # in this epoch or an earlier one: its rate is the phase-2 rate, not a phase-1 rate to divide.
            switched = _PHASE2_LEARNING_RATES.get(model)
            already = switched is not None and math.isclose(current, switched, rel_tol=1e-6)
            learning_rate = current if already else current / 10.0
        for tower in self.towers:
            if self.unlocked_groups is None:
                model.unlock(tower)
            else:
                model.lock(tower, self.unlocked_groups)
        model.set_learning_rate(learning_rate)
        _PHASE2_LEARNING_RATES[model] = learning_rate
