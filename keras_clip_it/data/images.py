"""Image decoding for every entry point: arrays, PIL images, paths, fsspec URIs and raw bytes.

All image inputs of the package go through `load_images`, so a corrupt file, a decompression bomb or a
wrong array shape is reported the same way everywhere: naming the item that was wrong and what to do.
"""

import io
import math
import os

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

# PIL's own default warns at ~89M pixels and raises at twice that; a hard, lower limit protects servers and
# batch jobs from decompression bombs (a PNG header may claim 50k x 50k pixels in a few hundred bytes).
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageDecodeError(ValueError):
    """An input could not be read as an image; the message names the item and what to do."""


def _describe(source, index):
    if isinstance(source, (str, os.PathLike)):
        what = repr(os.fspath(source))
    elif isinstance(source, (bytes, bytearray)):
        what = f"{len(source)} bytes"
    else:
        what = type(source).__name__
    return f"image {index} ({what})" if index is not None else f"image {what}"


def _open_bytes(data, label):
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ImageDecodeError(
                f"{label} claims {image.width}x{image.height} pixels, more than the limit of "
                f"{MAX_IMAGE_PIXELS:,}: resize it before passing it in"
            )
        image.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"{label} is too large to decode safely ({error}): resize it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(
            f"{label} is not a readable image ({error}); check that the file is a complete JPEG, PNG, "
            "GIF, BMP or WebP and re-download or re-export it"
        ) from None
    return image


def _read_source(source, label):
    path = os.fspath(source)
    if "://" in path:
        import fsspec

        try:
            with fsspec.open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise ImageDecodeError(f"{label} does not exist: check the URI") from None
    if not os.path.exists(path):
        raise ImageDecodeError(f"{label} does not exist: check the path")
    with open(path, "rb") as handle:
        return handle.read()


def to_rgb_array(source, index=None):
    """Decodes one image of any accepted kind to a uint8 (H, W, 3) RGB array.

    Args:
        source: a uint8 or float array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with values in
            [0, 255], a `PIL.Image.Image`, a local path, an fsspec URI ("s3://...", "memory://...") or the
            encoded bytes of a JPEG/PNG/GIF/BMP/WebP file.
        index: position of the item in a batch, used in error messages.

    Returns:
        A contiguous uint8 array of shape (H, W, 3).
    """
    label = _describe(source, index)
    if isinstance(source, (str, os.PathLike)):
        source = _open_bytes(_read_source(source, label), label)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        source = _open_bytes(bytes(source), label)
    if isinstance(source, Image.Image):
        if source.mode in ("RGBA", "LA", "P", "PA"):
            # Transparent pixels go on white, as a viewer shows them (emoji, logos, icons).
            rgba = source.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            source = Image.alpha_composite(background, rgba)
        return np.asarray(source.convert("RGB"), dtype=np.uint8)
    array = np.asarray(source)
    if array.dtype == object or array.ndim not in (2, 3):
        raise ImageDecodeError(
            f"{label} has shape {array.shape} and dtype {array.dtype}; expected an (H, W), (H, W, 1), "
            "(H, W, 3) or (H, W, 4) pixel array, a PIL image, a path, a URI or encoded bytes"
        )
    if array.ndim == 2:
        array = array[..., None]
    channels = array.shape[-1]
    if channels not in (1, 3, 4):
        raise ImageDecodeError(f"{label} has {channels} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number):
            raise ImageDecodeError(f"{label} has dtype {array.dtype}; expected uint8 or float pixels")
        if not np.all(np.isfinite(array)):
            raise ImageDecodeError(f"{label} contains NaN or infinite pixel values")
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    if channels == 4:
        return to_rgb_array(Image.fromarray(array, "RGBA"), index)
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def resize_and_crop(image, size, crop_pct=1.0, resample="bicubic"):
    """Resizes the shorter side to `size / crop_pct` and centre-crops `size`, as ImageNet evaluation does.

    The sizes follow the checkpoints' own processors, so embeddings match theirs on any image shape:
    the shorter side goes to `floor(size / crop_pct)` (timm), the longer side to the *truncated*
    proportional length (transformers' `CLIPImageProcessor`, torchvision's `Resize`: a 640 x 480 photo
    resized for 224 becomes 298 x 224, not 299 x 224), and the crop offset is floored.

    Args:
        image: uint8 (H, W, 3) array.
        size: (height, width) of the output.
        crop_pct: fraction of the resized image kept by the centre crop (0.875 for ImageNet CNNs, 1.0 for
            CLIP, which resizes the shorter side straight to the crop size).
        resample: "nearest", "bilinear", "bicubic" or "lanczos".

    Returns:
        uint8 array of shape (size[0], size[1], 3).
    """
    height, width = size
    if image.shape[0] == height and image.shape[1] == width:
        return image
    if resample not in RESAMPLING:
        raise ValueError(f"resample must be one of {sorted(RESAMPLING)}, got {resample!r}")
    # A little slack so that e.g. 224 / 0.875 is 256, not 255 from a float rounding error.
    short = int(math.floor(max(height, width) / crop_pct + 1e-6))
    image_h, image_w = image.shape[0], image.shape[1]
    if image_h <= image_w:
        new_h, new_w = short, int(short * image_w / image_h)
    else:
        new_h, new_w = int(short * image_h / image_w), short
    new_h, new_w = max(height, new_h), max(width, new_w)
    pil = Image.fromarray(image).resize((new_w, new_h), RESAMPLING[resample])
    top = (new_h - height) // 2
    left = (new_w - width) // 2
    return np.asarray(pil.crop((left, top, left + width, top + height)), dtype=np.uint8)


def as_image_batch(inputs):
    """`inputs` as a batch: a 4-D array (N, H, W, C), or a list of single images of any accepted kind.

    The rule for arrays, the same at every entry point: a 4-D array is a batch; a 3-D array whose last
    axis is 1, 3 or 4 is one (H, W, C) image; any other 3-D array is a batch of grey (N, H, W) images
    (`kci.datasets.fashion_mnist` returns (N, 28, 28)), except when its first axis is 3 or 4, where it
    may as well be one channels-first image: that shape is refused with how to pass either.

    Example:
    >>> as_image_batch(np.zeros((5, 28, 28), np.uint8)).shape
    (5, 28, 28, 1)
    """
    if isinstance(inputs, np.ndarray) and inputs.dtype != object:
        if inputs.ndim == 4:
            return inputs
        if inputs.ndim == 3 and inputs.shape[-1] not in (1, 3, 4):
            if inputs.shape[0] in (3, 4):
                raise ImageDecodeError(
                    f"an array of shape {inputs.shape} is ambiguous: {inputs.shape[0]} grey images or one "
                    "channels-first image; pass x[..., None] for a batch of grey images, or "
                    "np.moveaxis(x, 0, -1) for one image"
                )
            return inputs[..., None]
        return [inputs]
    if isinstance(inputs, (str, os.PathLike, bytes, bytearray, Image.Image)):
        return [inputs]
    return list(inputs)


def load_images(inputs, size=None, crop_pct=1.0, resample="bicubic"):
    """Decodes a batch of images of any accepted kind to one uint8 (N, H, W, 3) array.

    Args:
        inputs: a uint8/float array (N, H, W, C), (H, W, C) or (N, H, W) grey (see `as_image_batch`),
            or a list mixing arrays, PIL images, paths, fsspec URIs and encoded bytes (see
            `to_rgb_array`).
        size: (height, width) to resize and centre-crop to; required when the images differ in size.
        crop_pct: see `resize_and_crop`.
        resample: see `resize_and_crop`.

    Returns:
        uint8 array (N, H, W, 3).

    Example:
    >>> load_images([np.zeros((30, 40, 3), np.uint8)], size=(16, 16)).shape
    (1, 16, 16, 3)
    """
    items = as_image_batch(inputs)
    arrays = [to_rgb_array(item, index) for index, item in enumerate(items)]
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        arrays = [resize_and_crop(array, size, crop_pct, resample) for array in arrays]
    if not arrays:
        shape = (0, *(size or (0, 0)), 3)
        return np.zeros(shape, np.uint8)
    shapes = {array.shape for array in arrays}
    if len(shapes) > 1:
        raise ImageDecodeError(
            f"images have different sizes {sorted(shapes)[:3]}...; pass size=(H, W) to resize them"
        )
    return np.stack(arrays)
