"""What image and text encoders share: batched embedding with static shapes, normalisation, fingerprints."""

import hashlib
import json
import threading
import weakref

import keras
import numpy as np

# Per encoder: the lock that orders fingerprint reads with predictions and weight changes, and the last
# digest with what it was computed from. Kept outside the encoders so they stay plain Keras models
# (copyable, serialisable).
_STATE = weakref.WeakKeyDictionary()
_STATE_LOCK = threading.Lock()


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


# Config keys that do not change what an encoder computes: layer names differ between instances, and
# freezing an encoder (ASIF, LiT, a server) must not orphan the embeddings stored for it.
_NOT_COMPUTATION = ("name", "trainable")


def _strip_names(value):
    if isinstance(value, dict):
        return {key: _strip_names(item) for key, item in value.items() if key not in _NOT_COMPUTATION}
    if isinstance(value, (list, tuple)):
        return [_strip_names(item) for item in value]
    return value


class EncoderMixin:
    """Batching, fingerprinting and progress reporting for `ImageEncoder` and `TextEncoder`."""

    @property
    def fingerprint(self):
        """A stable hex digest of the encoder's architecture and weights.

        Collections store embeddings per fingerprint, so embeddings from different encoders (or from the
        same architecture with other weights, e.g. after fine-tuning) are never mixed. Layer names and
        `trainable` flags are left out: they change between instances (or when an encoder is frozen for
        ASIF or LiT) without changing what the encoder computes.

        Hashing every weight takes hundreds of milliseconds for a 100M-parameter encoder, so the digest
        is cached while the weights provably have not changed. On JAX a variable's value is an immutable
        array replaced by every assignment, so the cache is keyed on the identities of the current
        arrays (`predict_on_batch` reads them without replacing them). On
        other backends variables change in place: the digest is cached only while the encoder has no
        trainable weight, and `set_weights`, `load_weights` and setting `trainable` forget it (assigning
        a frozen variable directly with `variable.assign` there is not noticed). Reads, predictions and
        weight changes of one encoder are serialised by a lock, so a read never sees weights that a
        prediction in another thread is swapping.

        Example:
        >>> import keras_clip_it as kci
        >>> encoder = kci.TextEncoder.from_preset("all_minilm_l6_v2")
        >>> encoder.fingerprint == encoder.fingerprint  # the second read hashes nothing
        True
        """
        state = _state(self)
        with state.lock:
            config = json.dumps(_strip_names(self.get_config()), sort_keys=True, default=str)
            token = self._weights_token()
            cached = state.digest
            if cached is not None and cached[0] == config and token is not None and _same(cached[1], token):
                return cached[2]
            digest = hashlib.blake2b(digest_size=16)
            digest.update(type(self).__name__.encode())
            digest.update(config.encode())
            for weight in self.weights:
                value = _weight_bytes(weight)
                digest.update(str(value.shape).encode())
                digest.update(value.tobytes())
            state.digest = None if token is None else (config, token, digest.hexdigest())
            return digest.hexdigest()

    def _weights_token(self):
        """What proves the weights unchanged since the token was taken, or None when nothing can.

        JAX: weak references to the current value arrays (a live array's identity is unique, and any
        assignment installs a new one). Other backends: an empty tuple while no weight is trainable
        (nothing trains it; explicit weight changes forget the digest), else None.
        """
        if keras.backend.backend() == "jax":
            values = [_jax_value(weight) for weight in self.weights]
            return tuple(weakref.ref(value) for value in values)
        return None if self.trainable_weights else ()

    def predict_on_batch(self, x):
        """Keras's `predict_on_batch`; on JAX, one compiled inference that leaves the weights in place.

        Keras on JAX donates the weight arrays to each prediction and installs the returned ones, which
        costs a copy of every weight per call and forbids two predictions of one encoder at once. Here the
        compiled function (one per input shape) reads the current weight arrays and returns only the
        outputs, so concurrent calls from several threads (a server's workers) run side by side and the
        cached fingerprint stays valid. The first call for a new input shape compiles under this encoder's
        lock; an encoder that is not built yet takes Keras's own path.

        Collecting the variables from every layer costs more Python than a small batch's inference, so
        the list is kept with the layers' dtype policies and variable counts, which are checked on each
        call: a new dtype policy (mixed precision, quantization) or a variable added to a layer (LoRA)
        rebuilds the list and recompiles, while new weight values (`load_weights`, `set_weights`,
        training) are read from the same variables at each call.
        """
        if keras.backend.backend() != "jax" or not self.built:
            return super().predict_on_batch(x)
        state = _state(self)
        shapes = _input_signature(x)
        with state.lock:
            inference = state.inference
            if inference is None or not inference.describes(self):
                inference = state.inference = _Inference(self)
            values = inference.values()
            if shapes not in inference.compiled:
                outputs = inference.function(values, x)  # traces and compiles once, never concurrently
                inference.compiled.add(shapes)
                return keras.tree.map_structure(np.asarray, outputs)
        return keras.tree.map_structure(np.asarray, inference.function(values, x))

    def set_weights(self, weights):
        """Keras's `set_weights`; forgets the cached fingerprint."""
        state = _state(self)
        with state.lock:
            state.digest = None
            super().set_weights(weights)

    def load_weights(self, filepath, *args, **kwargs):
        """Keras's `load_weights`; forgets the cached fingerprint."""
        state = _state(self)
        with state.lock:
            state.digest = None
            return super().load_weights(filepath, *args, **kwargs)

    @property
    def trainable(self):
        """Keras's `trainable`; setting it forgets the cached fingerprint."""
        return keras.layers.Layer.trainable.fget(self)

    @trainable.setter
    def trainable(self, value):
        # Unfreezing and training on a backend whose variables change in place invalidates the digest.
        keras.layers.Layer.trainable.fset(self, value)
        state = _STATE.get(self)
        if state is not None:
            with state.lock:
                state.digest = None

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


class _FingerprintState:
    def __init__(self):
        self.lock = threading.RLock()
        self.digest = None  # (config json, weights token, hex digest)
        self.inference = None  # JAX: the compiled `_Inference`


class _Inference:
    """An encoder's jitted inference on JAX, with the variables and layer structure it was built for.

    The function takes the values of `variables` (every variable of the encoder, in a fixed order) and
    the inputs; which of them are trainable does not matter for inference, so freezing or unfreezing
    layers keeps it. Only the sublayers are held, never the encoder itself: the state it lives in is a
    weak-keyed value and must not keep the encoder alive.
    """

    def __init__(self, encoder):
        import jax

        self.layers = encoder._flatten_layers(include_self=False)
        self.structure = _structure(encoder, self.layers)
        self.variables = encoder.variables
        self.compiled = set()  # the input signatures the function has compiled
        variables = self.variables
        owner = weakref.ref(encoder)

        def inference(values, inputs):
            model = owner()
            by_variable = {id(variable): value for variable, value in zip(variables, values)}
            trainable = [by_variable[id(variable)] for variable in model.trainable_variables]
            non_trainable = [by_variable[id(variable)] for variable in model.non_trainable_variables]
            return model.stateless_call(trainable, non_trainable, inputs, training=False)[0]

        self.function = jax.jit(inference)

    def describes(self, encoder):
        """Whether `encoder` still has the layers, dtype policies and variable counts this was built for."""
        return _structure(encoder, self.layers) == self.structure

    def values(self):
        """The current value arrays of the variables (read without copying, as a fingerprint does)."""
        values = [variable._value for variable in self.variables]
        if any(value is None for value in values):
            for variable in self.variables:
                _jax_value(variable)  # raises, naming the variable a running fit holds
        return values


def _structure(encoder, layers):
    """What the compiled inference depends on besides weight values: per layer, the dtype policy and
    the number of variables and of sublayers."""
    return [
        (layer._dtype_policy, len(layer._trainable_variables) + len(layer._non_trainable_variables), len(layer._layers))
        for layer in (encoder, *layers)
    ]


def _input_signature(x):
    """The shapes and dtypes of a batch (an array or a dict of arrays): one compiled program each."""
    if isinstance(x, dict):
        return tuple((key, _input_signature(value)) for key, value in sorted(x.items()))
    x = x if hasattr(x, "dtype") else np.asarray(x)
    return tuple(x.shape), str(x.dtype)


def _state(encoder):
    with _STATE_LOCK:
        state = _STATE.get(encoder)
        if state is None:
            state = _STATE[encoder] = _FingerprintState()
        return state


def _same(token, other):
    """Whether two weight tokens name the same (live) arrays."""
    if other is None or len(token) != len(other):
        return False
    return all(a() is not None and a() is b() for a, b in zip(token, other))


def _jax_value(weight):
    # `.value` of a variable whose array is held by a running fit returns its initializer's output.
    value = getattr(weight, "_value", None)
    if value is None:
        raise RuntimeError(
            f"the weights of this encoder are held by a running fit or predict (variable {weight.path!r} has "
            "no value): read the fingerprint before or after it"
        )
    return value


def _weight_bytes(weight):
    """The contiguous numpy array of one weight: the only place a fingerprint reads weights."""
    return np.ascontiguousarray(np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight))


def _pad_rows(batch, size):
    if isinstance(batch, dict):
        return {key: _pad_rows(value, size) for key, value in batch.items()}
    pad = [(0, size - batch.shape[0])] + [(0, 0)] * (batch.ndim - 1)
    return np.pad(batch, pad)
