import gzip
import importlib.util
import math
import os
import shutil

import numpy as np
import pytest

from keras_clip_it.data import datasets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Checked in on purpose: if a rerun of scripts/draw_emoji.py moved any of these, the split would have
# changed under everyone's published numbers.
KNOWN_TRAIN_IDS = ["1f600", "2764-fe0f", "1f355", "1f408-200d-2b1b", "1f345", "1f9cc", "1f1f2-1f1f5"]
KNOWN_TEST_IDS = ["1f468-200d-1f373", "1f1ee-1f1f9", "2a-fe0f-20e3", "1f6a3-200d-2642-fe0f", "1fa73", "1f550"]
KNOWN_CAPTIONS = {
    "1f600": ("grinning face", "faccina con un gran sorriso"),
    "1f1ee-1f1f9": ("Italy flag", "bandiera italia"),
    "1f468-200d-1f373": ("man cook", "cuoco"),
    "1f408-200d-2b1b": ("black cat", "gatto nero"),
}


def _draw_emoji_script():
    spec = importlib.util.spec_from_file_location("draw_emoji", os.path.join(REPO, "scripts", "draw_emoji.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_emoji_pairs_shapes_counts_and_unique_ids():
    ids, images, captions = datasets.emoji_pairs(return_ids=True)
    assert 1800 <= len(ids) <= 2000
    assert images.shape == (len(ids), 128, 128, 3) and images.dtype == np.uint8
    assert len(captions) == len(ids) and all(isinstance(c, str) and c.strip() == c and c for c in captions)
    assert len(set(ids)) == len(ids)
    assert len(set(captions)) == len(captions)
    # The script dropped exact duplicate drawings, so each image has exactly one correct caption.
    assert len({image.tobytes() for image in images}) == len(images)


def test_emoji_splits_are_disjoint_cover_everything_and_are_stable():
    all_ids, all_images, _ = datasets.emoji_pairs(return_ids=True)
    train_ids, train_images, _ = datasets.emoji_pairs(split="train", return_ids=True)
    test_ids, test_images, _ = datasets.emoji_pairs(split="test", return_ids=True)
    assert not set(train_ids) & set(test_ids)
    assert sorted(train_ids + test_ids) == sorted(all_ids)
    assert 1400 <= len(train_ids) <= 1600 and 300 <= len(test_ids) <= 500
    assert set(KNOWN_TRAIN_IDS) <= set(train_ids)
    assert set(KNOWN_TEST_IDS) <= set(test_ids)
    position = {item_id: i for i, item_id in enumerate(all_ids)}
    np.testing.assert_array_equal(test_images, all_images[[position[i] for i in test_ids]])
    # The split is a function of the id alone, so redrawing (or adding emoji) never moves a pair.
    split_of = _draw_emoji_script().split_of
    assert all(split_of(i) == "train" for i in train_ids) and all(split_of(i) == "test" for i in test_ids)


def test_english_and_italian_captions_align_pair_by_pair():
    en_ids, en_images, en_captions = datasets.emoji_pairs(lang="en", return_ids=True)
    it_ids, it_images, it_captions = datasets.emoji_pairs(lang="it", return_ids=True)
    assert en_ids == it_ids
    np.testing.assert_array_equal(en_images, it_images)
    for item_id, (english, italian) in KNOWN_CAPTIONS.items():
        index = en_ids.index(item_id)
        assert (en_captions[index], it_captions[index]) == (english, italian)


def test_emoji_images_show_their_emoji_on_white():
    ids, images, _ = datasets.emoji_pairs(return_ids=True)
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners >= 250).mean() > 0.99
    # Even the palest emoji (white small square, tooth) have ~180 clearly non-white pixels.
    ink = ((255 - images.astype(np.int16)).max(axis=-1) > 40).sum(axis=(1, 2))
    assert ink.min() >= 100, f"an (almost) empty drawing slipped through: {ids[int(ink.argmin())]}"
    flag = images[ids.index("1f1ee-1f1f9")].astype(int)
    thirds = (slice(15, 40), slice(55, 75), slice(90, 115))
    left, middle, right = (flag[40:90, columns].mean((0, 1)) for columns in thirds)
    assert left[1] > left[0] + 60 and right[0] > right[1] + 60 and middle.min() > 200  # green, white, red
    face = images[ids.index("1f600")].astype(int)[50:60, 20:40].mean((0, 1))
    assert face[0] > 200 and face[1] > 150 and face[2] < 100  # yellow


def test_emoji_pairs_returns_copies():
    images, captions = datasets.emoji_pairs(split="test")
    images[:] = 0
    captions.clear()
    again, captions_again = datasets.emoji_pairs(split="test")
    assert again.max() == 255 and len(captions_again) == len(again)


@pytest.mark.parametrize("kwargs", [{"lang": "fr"}, {"lang": "EN"}, {"split": "val"}, {"split": None}])
def test_emoji_pairs_rejects_unknown_lang_and_split(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"unknown {name} .*'en'|unknown {name} .*'train'"):
        datasets.emoji_pairs(**kwargs)


@pytest.fixture
def damaged_install(tmp_path, monkeypatch):
    """A copy of the embedded files that a test may damage, with the decoded-data cache bypassed."""
    for name in os.listdir(datasets.EMBEDDED_DIR):
        shutil.copy(os.path.join(datasets.EMBEDDED_DIR, name), tmp_path)
    monkeypatch.setattr(datasets, "EMBEDDED_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "EMOJI_MANIFEST", str(tmp_path / "emoji.json"))
    datasets._emoji_data.cache_clear()
    yield tmp_path
    datasets._emoji_data.cache_clear()


def test_a_damaged_emoji_sheet_or_missing_avif_support_is_a_clear_error(damaged_install, monkeypatch):
    sheet = damaged_install / "emoji_128.avif"
    data = sheet.read_bytes()
    sheet.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="does not match its checksum: .*reinstall keras-clip-it"):
        datasets.emoji_pairs()
    sheet.unlink()
    with pytest.raises(FileNotFoundError, match="emoji_128.avif' is missing: .*reinstall"):
        datasets.emoji_pairs()
    sheet.write_bytes(data)
    from PIL import features

    monkeypatch.setattr(features, "check", lambda feature: feature != "avif")
    with pytest.raises(RuntimeError, match="cannot decode AVIF.*Pillow >= 11.3"):
        datasets.emoji_pairs()


def test_embedded_files_fit_the_budget_and_carry_their_licences():
    names = os.listdir(datasets.EMBEDDED_DIR)
    sizes = {name: os.path.getsize(os.path.join(datasets.EMBEDDED_DIR, name)) for name in names}
    assert sum(sizes.values()) <= 10 * 1024 * 1024, sizes
    with open(os.path.join(datasets.EMBEDDED_DIR, "NOTICE"), encoding="utf-8") as file:
        notice = file.read()
    for licence in ("SIL Open Font License", "BSD", "Unicode License", "MIT"):
        assert licence in notice


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.exists("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"), reason="needs fonts-noto-color-emoji"
)
def test_draw_script_reproduces_the_embedded_images():
    from PIL import ImageFont

    script = _draw_emoji_script()
    font = ImageFont.truetype(script.DEFAULT_FONT, script.FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
    ids, images, _ = datasets.emoji_pairs(return_ids=True)
    for item_id in KNOWN_TRAIN_IDS + KNOWN_TEST_IDS:
        chars = "".join(chr(int(code, 16)) for code in item_id.split("-"))
        drawn = script.draw(font, chars).astype(np.float64)
        error = ((drawn - images[ids.index(item_id)]) ** 2).mean()
        assert 10 * math.log10(255**2 / max(error, 1e-12)) > 30, item_id  # only AVIF's loss between them
    assert script.draw(font, "\U0010fffd") is None  # a code point the font has no glyph for


def test_fashion_mnist_from_the_debian_package():
    (x, y), names = datasets.fashion_mnist("test", lang="it")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 1000))
    assert names[y[0]] == "stivaletto" and names[0] == "maglietta/top"
    (x_train, y_train), names_en = datasets.fashion_mnist("train", lang="en")
    assert x_train.shape == (60000, 28, 28) and y_train.dtype == np.int64
    upstream = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert names_en == upstream
    assert len(set(names)) == 10
    x[:] = 0
    assert datasets.fashion_mnist("test")[0][0].max() == 255  # callers get copies of the cache


def _write_idx(path, array, compress=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with open(path, "wb") as file:
        file.write(gzip.compress(data) if compress else data)


def _fake_split(directory, split="test", n=6, compress=True, labels=None):
    images_name, labels_name = datasets.FASHION_MNIST_SPLITS[split]
    suffix = ".gz" if compress else ""
    x = np.random.RandomState(0).randint(0, 256, (n, 28, 28))
    y = np.arange(n) % 10 if labels is None else labels
    _write_idx(os.path.join(directory, images_name + suffix), x, compress)
    _write_idx(os.path.join(directory, labels_name + suffix), np.asarray(y), compress)
    return x, y


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_a_user_directory_gzipped_or_not(tmp_path, compress):
    x, y = _fake_split(str(tmp_path), compress=compress)
    (got_x, got_y), _ = datasets.fashion_mnist("test", path=tmp_path)
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)


def test_fashion_mnist_reads_an_fsspec_uri(tmp_path):
    import fsspec

    x, _ = _fake_split(str(tmp_path))
    for name in os.listdir(tmp_path):
        with open(tmp_path / name, "rb") as source, fsspec.open(f"memory://fmnist-test/{name}", "wb") as target:
            shutil.copyfileobj(source, target)
    (got_x, _), _ = datasets.fashion_mnist("test", path="memory://fmnist-test")
    np.testing.assert_array_equal(got_x, x)


def test_fashion_mnist_truncated_gzip_is_a_clear_error(tmp_path):
    images_name, labels_name = datasets.FASHION_MNIST_SPLITS["test"]
    source = os.path.join(datasets.FASHION_MNIST_DIR, labels_name + ".gz")
    shutil.copy(os.path.join(datasets.FASHION_MNIST_DIR, images_name + ".gz"), tmp_path)
    with open(source, "rb") as file:
        (tmp_path / (labels_name + ".gz")).write_bytes(file.read()[:2000])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*corrupt or truncated"):
        datasets.fashion_mnist("test", path=tmp_path)


def test_fashion_mnist_truncated_payload_and_bad_files_are_clear_errors(tmp_path):
    images_name, labels_name = datasets.FASHION_MNIST_SPLITS["test"]
    _fake_split(str(tmp_path))
    with gzip.open(tmp_path / (images_name + ".gz"), "rb") as file:
        data = file.read()
    (tmp_path / (images_name + ".gz")).write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(ValueError, match="has 4,620 bytes, its header .* needs 4,720"):
        datasets.fashion_mnist("test", path=tmp_path)

    (tmp_path / (images_name + ".gz")).write_bytes(gzip.compress(b"PK\x03\x04 not an idx file"))
    with pytest.raises(ValueError, match="not a 3-d unsigned-byte idx file"):
        datasets.fashion_mnist("test", path=tmp_path)

    other = tmp_path / "mismatch"
    other.mkdir()
    _fake_split(str(other), n=6)
    _write_idx(str(other / (labels_name + ".gz")), np.arange(5))
    with pytest.raises(ValueError, match="6 test images but 5 labels"):
        datasets.fashion_mnist("test", path=other)

    bad_labels = tmp_path / "labels"
    bad_labels.mkdir()
    _fake_split(str(bad_labels), labels=np.array([0, 1, 2, 3, 4, 12]))
    with pytest.raises(ValueError, match="label 12, Fashion-MNIST labels are 0..9"):
        datasets.fashion_mnist("test", path=bad_labels)


def test_fashion_mnist_missing_files_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz not found in .*check the path"):
        datasets.fashion_mnist("test", path=tmp_path)
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        datasets.fashion_mnist("validation")
    with pytest.raises(ValueError, match="unknown lang 'de'"):
        datasets.fashion_mnist("test", lang="de")
