"""Where training runs: one device, every local device, or the TPU cores, on JAX or TensorFlow.

On JAX a `keras.distribution.DataParallel` is set globally: each step is one program over the global
batch, sharded by XLA. On TensorFlow the model must be created inside a `tf.distribute` strategy's
scope (`MirroredStrategy` over the local devices, `TPUStrategy`); `fit` then splits every batch over the
replicas and the contrastive losses gather the embeddings back (see `keras_clip_it.losses`). Nothing
here imports Keras at module level: `split_host_cpu` must run before the backend starts.
"""

import contextlib
import os

KINDS = ("none", "data-parallel", "tpu")


def split_host_cpu(devices):
    """Makes the host CPU appear as `devices` devices, to try data-parallel training without accelerators.

    Call it before the backend starts: JAX reads its device count from `XLA_FLAGS` when it initialises,
    and TensorFlow's logical devices cannot change once its runtime runs.

    Args:
        devices: int, the number of CPU devices (1 leaves the CPU as it is).
    """
    if devices <= 1:
        return
    if os.environ.get("KERAS_BACKEND", "jax") == "jax":
        flag = f"--xla_force_host_platform_device_count={devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
        return
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)


class Distribution:
    """The devices training runs on: `scope()` wraps building and compiling the model, `devices` counts them.

    Args:
        kind: "none" (one device), "data-parallel" (every local device: `DataParallel` on JAX,
            `MirroredStrategy` on TensorFlow) or "tpu" (the TPU cores: `DataParallel` on JAX,
            `TPUStrategy` on TensorFlow).
        tpu: TPU name or address for `TPUStrategy` ("": the local TPU VM).

    Raises:
        RuntimeError: "tpu" where the backend finds no TPU.

    Example:
    >>> distribution = Distribution("data-parallel")  # doctest: +SKIP
    >>> with distribution.scope():  # doctest: +SKIP
    ...     model = kci.DualEncoder(img, txt)
    ...     model.compile()
    """

    def __init__(self, kind="none", tpu=""):
        if kind not in KINDS:
            raise ValueError(f"unknown distribution {kind!r}: use one of {', '.join(map(repr, KINDS))}")
        import keras

        self.kind = kind
        self.strategy = None
        self.devices = 1
        if kind == "none":
            return
        if keras.backend.backend() == "jax":
            import jax

            if kind == "tpu" and jax.default_backend() != "tpu":
                raise RuntimeError(f"JAX sees no TPU (its devices: {jax.devices()}); run on a TPU VM, or use data-parallel")
            devices = keras.distribution.list_devices()
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
            self.devices = len(devices)
            return
        import tensorflow as tf

        if kind == "tpu":
            try:
                resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
                tf.config.experimental_connect_to_cluster(resolver)
                tf.tpu.experimental.initialize_tpu_system(resolver)
            except (ValueError, tf.errors.OpError) as error:
                raise RuntimeError(
                    f"no TPU found ({error}); name one, run on a TPU VM, or use data-parallel"
                ) from None
            self.strategy = tf.distribute.TPUStrategy(resolver)
        else:
            gpus = tf.config.list_logical_devices("GPU")
            devices = [device.name for device in (gpus or tf.config.list_logical_devices("CPU"))]
            self.strategy = tf.distribute.MirroredStrategy(devices=devices)
        self.devices = self.strategy.num_replicas_in_sync

    def scope(self):
        """The context to build and compile the model in (the strategy's scope on TensorFlow)."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def describe(self):
        """A readable summary, such as "data-parallel (2 devices)"."""
        return f"{self.kind} ({self.devices} device{'s' if self.devices > 1 else ''})"
