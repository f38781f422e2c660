"""Every model round-trips through `.keras`: `keras.saving.load_model(path, safe_mode=True)` in a new process
that imported only `keras_clip_it`, no custom_objects; the DualEncoder and the ASIF also on the other backend.

Serving reloads models from `.keras` files, so each kind is checked here in one place: tiny towers of
every layer type the package builds on (ViT, batch-norm CNN, BERT with keras-hub's tokenizer), the real
offline presets (EfficientNet-Lite0 with its ImageNet head, all-MiniLM-L6-v2, multilingual-e5-small), a
DualEncoder with a locked tower, and an ASIF with its collection. Outputs after reloading equal the
original's.
"""

import keras
import numpy as np
import pytest

import keras_clip_it as kci
from tests.helpers import assert_keras_roundtrip
from tests.models.test_dual_encoder_towers import tiny_image_encoder
from tests.models.test_dual_encoder_towers import tiny_model
from tests.models.test_dual_encoder_towers import tiny_pairs
from tests.models.test_dual_encoder_towers import tiny_text_encoder

BOTH = ("jax", "tensorflow")
TEXTS = ["a red cat", "una foto di un gatto nero", "Il caffè è pronto!", "", "the big blue car near a tree"]


def emoji_images(count=4):
    _, images, _ = kci.datasets.emoji_pairs(lang="en", split="test", return_ids=True)
    return images[:count]


@pytest.mark.tf_parity
@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_tiny_image_encoders(kind, tmp_path):
    images, _ = tiny_pairs(4)
    reloaded = assert_keras_roundtrip(tiny_image_encoder(kind), lambda model: model.embed(images), tmp_path)
    assert reloaded.image_size == (32, 32)


@pytest.mark.tf_parity
def test_tiny_text_encoder_keeps_its_tokenizer(tmp_path):
    encoder = tiny_text_encoder()
    reloaded = assert_keras_roundtrip(encoder, lambda model: model.embed(TEXTS), tmp_path)
    tokens, again = encoder.tokenize(TEXTS), reloaded.tokenize(TEXTS)
    for name in tokens:
        np.testing.assert_array_equal(again[name], tokens[name])


@pytest.mark.tf_parity
def test_dual_encoder_keeps_projections_temperature_and_locks(tmp_path):
    model = tiny_model(image="cnn", logit_scale=20.0, learn_logit_scale=False)
    model.lock("image")
    images, captions = tiny_pairs(4)
    reloaded = assert_keras_roundtrip(
        model, lambda m: [m.encode_images(images), m.encode_texts(captions), m.logit_scale], tmp_path,
        backends=BOTH,
    )
    assert reloaded.locked_towers == {"image": 0}
    assert not reloaded.image_encoder.trainable and not reloaded.learn_logit_scale


@pytest.mark.tf_parity
def test_asif_keeps_its_collection(tmp_path):
    asif = kci.ASIF(tiny_image_encoder(), tiny_text_encoder(), k=8, p=4.0, anchor_dtype="float16",
                    unknown_threshold=0.01)
    images, captions = tiny_pairs(32)
    asif.add([f"pair-{i}" for i in range(32)], images=images, captions=captions,
             metadata=[{"row": i} for i in range(32)])
    asif.remove(["pair-3"])
    queries, _ = tiny_pairs(6, seed=1)
    labels = ["red", "blue", "green", "yellow"]

    def run(model):
        representation = model.encode_images(queries)
        return [representation.indices, representation.values, model.classify(queries, labels, "en").scores]

    reloaded = assert_keras_roundtrip(asif, run, tmp_path, atol=1e-5, backends=BOTH)
    assert reloaded.collection.ids == asif.collection.ids and reloaded.collection.captions == asif.collection.captions
    assert reloaded.collection.metadata == asif.collection.metadata
    assert (reloaded.k, reloaded.p, reloaded.anchor_dtype, reloaded.unknown_threshold) == (8, 4.0, "float16", 0.01)
    assert reloaded.classify(queries, labels, "en").labels == asif.classify(queries, labels, "en").labels


@pytest.mark.slow
@pytest.mark.tf_parity
def test_efficientnet_lite0_with_its_imagenet_head(tmp_path):
    encoder = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
    images = emoji_images()
    reloaded = assert_keras_roundtrip(encoder, lambda model: model.embed(images), tmp_path, atol=1e-5)
    before, after = encoder.classify(images, top_k=3), reloaded.classify(images, top_k=3)
    assert [[name for name, _ in row] for row in after] == [[name for name, _ in row] for row in before]
    np.testing.assert_allclose([[p for _, p in row] for row in after], [[p for _, p in row] for row in before],
                               atol=1e-5)
    assert reloaded.fingerprint == encoder.fingerprint


@pytest.mark.slow
@pytest.mark.tf_parity
def test_all_minilm_l6_v2(tmp_path):
    encoder = kci.TextEncoder.from_preset("all_minilm_l6_v2")
    reloaded = assert_keras_roundtrip(encoder, lambda model: model.embed(TEXTS), tmp_path, atol=1e-5)
    assert reloaded.fingerprint == encoder.fingerprint


@pytest.mark.slow
def test_multilingual_e5_small(tmp_path):
    encoder = kci.TextEncoder.from_preset("multilingual_e5_small")
    reloaded = assert_keras_roundtrip(encoder, lambda model: model.embed(TEXTS), tmp_path, atol=1e-5)
    assert reloaded.prefix == encoder.prefix


@pytest.mark.parametrize("family", ["DualEncoder", "ASIF"])
def test_the_cli_serves_a_keras_file_in_a_new_process(family, tmp_path):
    """`keras-clip-it classify --model x.keras` in a subprocess gives the saving process's answers."""
    import json
    import os
    import subprocess
    import sys

    from PIL import Image

    images, captions = tiny_pairs(16)
    if family == "DualEncoder":
        model = tiny_model(image="cnn")
    else:
        model = kci.ASIF(tiny_image_encoder(), tiny_text_encoder(), k=8, p=4.0)
        model.add([f"pair-{i}" for i in range(16)], images=images, captions=captions)
    path, output = str(tmp_path / "model.keras"), str(tmp_path / "out.json")
    model.save(path)
    files = []
    for index in range(3):
        files.append(str(tmp_path / f"query-{index}.png"))
        Image.fromarray(images[index]).save(files[-1])
    labels = ["red", "blue", "green", "yellow"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-m", "keras_clip_it.cli", "classify", *files, "--labels", *labels, "--model", path,
         "--lang", "en", "--templates", "{}", "--top-k", "4", "--output", output],
        capture_output=True, text=True, timeout=600, cwd=root,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads(open(output, encoding="utf-8").read())["predictions"]
    expected = kci.ZeroShotClassifier(model, labels, templates="{}").predict(images[:3], top_k=4)
    assert len(predictions) == 3
    for prediction, want in zip(predictions, expected):
        assert [top["label"] for top in prediction["top"]] == [label for label, _ in want]
        np.testing.assert_allclose([top["score"] for top in prediction["top"]], [score for _, score in want],
                                   atol=1e-4)
