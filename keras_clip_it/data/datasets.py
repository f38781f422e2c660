"""Offline datasets: embedded emoji (image, caption) pairs in English and Italian, and Fashion-MNIST.

Examples, tests and the ASIF demo need real image-text data on machines where only the package registries
are reachable. The emoji pairs ship inside the package (drawn by scripts/draw_emoji.py, licences in
data/embedded/NOTICE); Fashion-MNIST is read from Debian's `dataset-fashion-mnist` or any directory or
fsspec URI holding its four idx files. Decoded arrays are cached per process, and every call returns
fresh copies, so callers may modify what they get.
"""

import functools
import gzip
import hashlib
import json
import os
import zlib

import numpy as np

LANGUAGES = ("en", "it")
EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")
EMOJI_MANIFEST = os.path.join(EMBEDDED_DIR, "emoji.json")
EMOJI_SPLITS = ("all", "train", "test")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# English names as in the Fashion-MNIST README. Italian: everyday shop words, each a distinct noun, so
# prompts such as "una foto di {}" read naturally ("maglione" rather than the loanword "pullover",
# "stivaletto" for the ankle boot, "scarpa da ginnastica" for the sneaker).
FASHION_MNIST_CLASS_NAMES = {
    "en": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "it": [
        "maglietta/top",
        "pantaloni",
        "maglione",
        "vestito",
        "cappotto",
        "sandalo",
        "camicia",
        "scarpa da ginnastica",
        "borsa",
        "stivaletto",
    ],
}
IDX_UNSIGNED_BYTE = 0x08


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: use one of {', '.join(map(repr, choices))}")


def emoji_pairs(lang="en", split="all", return_ids=False):
    """Emoji images with their English or Italian names: ~1,900 offline (image, caption) pairs.

    A small, real image-text set that needs no network and no system font: every Noto Color Emoji
    drawing the font can render, captioned with its Unicode CLDR name ("grinning face" / "faccina con
    un gran sorriso"). Ids are the emoji's code points ("1f600", "1f468-200d-1f373") and the train/test
    split is a fixed hash of the id, so both are stable across releases and machines. Images and
    captions are in the same order in both languages, so `lang="en"` and `lang="it"` align pair by pair.

    Args:
        lang: str, "en" or "it", the language of the captions.
        split: str, "all", "train" (~1,500 pairs) or "test" (~400 pairs).
        return_ids: bool, also return the ids (first element of the result).

    Returns:
        `(images, captions)`, or `(ids, images, captions)` with `return_ids=True`: images a uint8 array
        (N, 128, 128, 3) of RGB drawings on white, captions and ids lists of N strings.

    Example:
        >>> images, captions = emoji_pairs(lang="it", split="test")
        >>> images.shape[1:], images.dtype
        ((128, 128, 3), dtype('uint8'))
    """
    _check_choice("lang", lang, LANGUAGES)
    _check_choice("split", split, EMOJI_SPLITS)
    items, tiles = _emoji_data()
    index = [i for i, item in enumerate(items) if split == "all" or item["split"] == split]
    images = tiles[index]
    captions = [items[i][lang] for i in index]
    if return_ids:
        return [items[i]["id"] for i in index], images, captions
    return images, captions


@functools.lru_cache(maxsize=1)
def _emoji_data():
    """The manifest items and all tiles (read-only), decoded once per process from the sprite sheet."""
    reinstall = "the package installation is damaged: reinstall keras-clip-it (pip install --force-reinstall)"
    try:
        with open(EMOJI_MANIFEST, encoding="utf-8") as file:
            manifest = json.load(file)
        sheet_path = os.path.join(EMBEDDED_DIR, manifest["sheet"])
        with open(sheet_path, "rb") as file:
            sheet_bytes = file.read()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"embedded emoji file {error.filename!r} is missing: {reinstall}") from None
    except (json.JSONDecodeError, KeyError) as error:
        raise ValueError(f"embedded emoji manifest {EMOJI_MANIFEST!r} is unreadable ({error}): {reinstall}") from None
    if hashlib.sha256(sheet_bytes).hexdigest() != manifest["sheet_sha256"]:
        raise ValueError(f"embedded emoji sheet {sheet_path!r} does not match its checksum: {reinstall}")

    import io

    from PIL import Image
    from PIL import features

    if not features.check("avif"):
        raise RuntimeError(
            f"this Pillow ({Image.__version__}) cannot decode AVIF, the format of the embedded emoji "
            "images: install Pillow >= 11.3 (pip install -U pillow)"
        )
    sheet = np.asarray(Image.open(io.BytesIO(sheet_bytes)).convert("RGB"))
    size, columns, count = manifest["tile_size"], manifest["columns"], manifest["count"]
    rows = sheet.shape[0] // size
    tiles = sheet.reshape(rows, size, columns, size, 3).transpose(0, 2, 1, 3, 4).reshape(-1, size, size, 3)
    tiles = np.ascontiguousarray(tiles[:count])
    tiles.flags.writeable = False
    return manifest["items"], tiles


def fashion_mnist(split="train", lang="en", path=None):
    """Fashion-MNIST images, labels and class names in English or Italian.

    The standard small benchmark for zero-shot and linear-probe checks, without a download: by default
    it is read from Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist). Any directory
    or fsspec URI holding the four idx files (gzipped or not, as published by Zalando) works too.

    Args:
        split: str, "train" (60,000 images) or "test" (10,000 images).
        lang: str, "en" or "it", the language of the class names.
        path: optional str or path-like, a directory or fsspec URI ("s3://bucket/fashion-mnist") with
            `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`,
            `t10k-labels-idx1-ubyte.gz`.

    Returns:
        `((x, y), class_names)`: x uint8 (N, 28, 28) grey images (0 = background), y int64 (N,) labels
        0..9, class_names a list of 10 strings indexed by label.

    Example:
        >>> (x, y), class_names = fashion_mnist("test", lang="it")
        >>> x.shape, class_names[y[0]]
        ((10000, 28, 28), 'stivaletto')
    """
    _check_choice("split", split, tuple(FASHION_MNIST_SPLITS))
    _check_choice("lang", lang, LANGUAGES)
    location = FASHION_MNIST_DIR if path is None else os.fspath(path)
    x, y = _fashion_mnist_arrays(split, location.rstrip("/"))
    return (x.copy(), y.copy()), list(FASHION_MNIST_CLASS_NAMES[lang])


@functools.lru_cache(maxsize=4)
def _fashion_mnist_arrays(split, location):
    images_name, labels_name = FASHION_MNIST_SPLITS[split]
    x = _read_idx(location, images_name, ndim=3)
    y = _read_idx(location, labels_name, ndim=1)
    if x.shape[1:] != (28, 28):
        raise ValueError(f"{images_name} in {location!r} holds {x.shape[1:]} images, not 28x28: is it Fashion-MNIST?")
    if len(x) != len(y):
        raise ValueError(
            f"{location!r} has {len(x)} {split} images but {len(y)} labels: the files do not belong together"
        )
    if y.size and y.max() >= len(FASHION_MNIST_CLASS_NAMES["en"]):
        raise ValueError(f"{labels_name} in {location!r} has label {y.max()}, Fashion-MNIST labels are 0..9")
    return x, y.astype(np.int64)


def _read_idx(location, name, ndim):
    """One idx file (gzipped or plain) from a directory or fsspec URI, as a read-only uint8 array."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(location)
    for filename in (f"{name}.gz", name):
        file_path = f"{root}/{filename}"
        if fs.isfile(file_path):
            break
    else:
        if location == FASHION_MNIST_DIR:
            how = "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"
        else:
            how = "check the path, or pass path=None to read Debian's dataset-fashion-mnist"
        raise FileNotFoundError(f"Fashion-MNIST file {name}.gz not found in {location!r}: {how}")
    with fs.open(file_path, "rb") as file:
        data = file.read()
    where = f"Fashion-MNIST file {filename!r} in {location!r}"
    fix = "delete it and copy it again (or reinstall dataset-fashion-mnist)"
    if filename.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as error:
            raise ValueError(f"{where} is corrupt or truncated ({error}): {fix}") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:2] != b"\0\0" or data[2] != IDX_UNSIGNED_BYTE or data[3] != ndim:
        raise ValueError(f"{where} is not a {ndim}-d unsigned-byte idx file (bad header {data[:4].hex()}): {fix}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(f"{where} has {len(data):,} bytes, its header {shape} needs {expected:,}: {fix}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)
