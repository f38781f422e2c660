import io

import numpy as np
import pytest
from PIL import Image

from keras_clip_it.data.images import ImageDecodeError
from keras_clip_it.data.images import load_images
from keras_clip_it.data.images import resize_and_crop
from keras_clip_it.data.images import to_rgb_array


def _png_bytes(array, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_kind_of_input_decodes_to_the_same_pixels(tmp_path):
    rgb = np.random.RandomState(0).randint(0, 256, (12, 10, 3)).astype(np.uint8)
    data = _png_bytes(rgb)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    import fsspec

    with fsspec.open("memory://images/image.png", "wb") as handle:
        handle.write(data)
    sources = [rgb, rgb.astype(np.float32), Image.fromarray(rgb), str(path), path, data, "memory://images/image.png"]
    batch = load_images(sources)
    assert batch.shape == (len(sources), 12, 10, 3) and batch.dtype == np.uint8
    for row in batch:
        np.testing.assert_array_equal(row, rgb)


def test_grey_and_transparent_images_become_rgb():
    grey = np.full((4, 4), 7, np.uint8)
    np.testing.assert_array_equal(to_rgb_array(grey), np.full((4, 4, 3), 7, np.uint8))
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black: shown on white
    np.testing.assert_array_equal(to_rgb_array(rgba), np.full((4, 4, 3), 255, np.uint8))


def test_resize_and_crop_keeps_the_centre():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 50:150] = 255  # a white centre square
    out = resize_and_crop(image, (50, 50), crop_pct=1.0, resample="nearest")
    assert out.shape == (50, 50, 3)
    assert out.min() == 255


def test_mixed_sizes_need_a_size():
    with pytest.raises(ImageDecodeError, match="size="):
        load_images([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 5, 3), np.uint8)])
    assert load_images([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 5, 3), np.uint8)], size=3).shape == (2, 3, 3, 3)


def test_empty_batch():
    assert load_images([], size=(8, 8)).shape == (0, 8, 8, 3)


@pytest.mark.parametrize(
    "source, message",
    [
        (b"", "not a readable image"),
        (_png_bytes(np.zeros((8, 8, 3), np.uint8))[:40], "not a readable image"),
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "not a readable image"),
        ("/no/such/file.jpg", "does not exist"),
        ("memory://no/such/file.png", "does not exist"),
        (np.zeros((4, 4, 2)), "2 channels"),
        (np.zeros((2, 2, 2, 2, 3)), "shape"),
        (np.full((4, 4, 3), np.nan), "NaN"),
        (np.array([["a"]]), "dtype"),
    ],
)
def test_bad_input_names_the_item(source, message):
    with pytest.raises(ImageDecodeError, match=message) as info:
        load_images([np.zeros((4, 4, 3), np.uint8), source])
    if not isinstance(source, np.ndarray) or source.ndim != 5:
        assert "image 1" in str(info.value)


def test_decompression_bomb_is_refused_before_decoding():
    # A valid PNG header claiming 50,000 x 50,000 pixels, with almost no data behind it.
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    with pytest.raises(ImageDecodeError, match="pixels|too large"):
        to_rgb_array(bomb)


@pytest.mark.parametrize("shape", [(45, 57), (57, 45), (480, 640), (33, 100), (100, 33), (31, 47), (17, 29), (64, 32)])
def test_resize_and_crop_matches_transformers_clip_processor_on_any_shape(shape):
    """CLIP checkpoints were trained on what their processor gives: the same pixels, on non-square images too."""
    transformers = pytest.importorskip("transformers")
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_normalize=False, do_rescale=False
    )
    image = np.random.RandomState(sum(shape)).randint(0, 256, shape + (3,)).astype(np.uint8)
    want = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_array_equal(resize_and_crop(image, (32, 32), crop_pct=1.0, resample="bicubic"), want)


def test_crop_pct_resizes_the_shorter_side_to_the_floor_of_size_over_crop_pct():
    image = np.random.RandomState(1).randint(0, 256, (480, 640, 3)).astype(np.uint8)
    # 224 / 0.875 = 256 exactly: the shorter side goes to 256 and the longer to int(256 * 640 / 480) = 341.
    resized = np.asarray(Image.fromarray(image).resize((341, 256), Image.BICUBIC))
    want = resized[16:240, 58:282]
    np.testing.assert_array_equal(resize_and_crop(image, (224, 224), crop_pct=0.875), want)
