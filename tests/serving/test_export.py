"""kci.serving.export: SavedModel endpoints reloaded with tf.saved_model.load and keras.layers.TFSMLayer.

Every endpoint's outputs are compared with the Keras model's own methods (encode_images, encode_texts,
ZeroShotClassifier, ASIF.classify) to 1e-5. Tiny random towers keep the exports to seconds; the slow test
exports the real offline encoders.
"""

import json
import os
import subprocess
import sys
import textwrap

import fsspec
import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_text  # noqa: F401 - registers the tokenizer ops the text endpoints use

import keras_clip_it as kci
from tests.models.test_dual_encoder_towers import VOCABULARY
from tests.models.test_dual_encoder_towers import tiny_image_encoder
from tests.models.test_dual_encoder_towers import tiny_model
from tests.models.test_dual_encoder_towers import tiny_pairs
from tests.models.test_dual_encoder_towers import tiny_text_encoder

ATOL = 1e-5
LABELS = ["red", "blue", "green", "yellow"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def dual(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = tiny_model()
    path = str(tmp_path_factory.mktemp("dual") / "1")
    endpoints = kci.serving.export(model, path, labels=LABELS, templates="en")
    return model, path, endpoints


@pytest.fixture(scope="module")
def asif(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = kci.ASIF(tiny_image_encoder(), tiny_text_encoder(), k=12, p=3.0, anchor_dtype="int8")
    images, captions = tiny_pairs(64)
    model.add([f"pair-{i}" for i in range(64)], images=images, captions=captions)
    queries, _ = tiny_pairs(12, seed=1)
    # A threshold between two best scores (not on one: rounding would decide), so that 4 answers are "unknown".
    best = np.sort(model.classify(queries, labels=LABELS, templates="en").scores.max(axis=1))
    model.unknown_threshold = float(best[3] + best[4]) / 2
    path = str(tmp_path_factory.mktemp("asif") / "1")
    kci.serving.export(model, path, labels=LABELS, templates="en")
    return model, path


def queries():
    images, captions = tiny_pairs(12, seed=1)
    return images, ["a red cat", "the blue car", "green", "a big yellow sun and a small dog", ""] + captions[:7]


def texts(array):
    return [value.decode() if isinstance(value, bytes) else str(value) for value in array]


def assert_dual_outputs(model, run):
    """`run(endpoint, inputs)` -> dict of numpy outputs, for a reload of the `dual` export."""
    images, captions = queries()
    np.testing.assert_allclose(run("encode_image", images)["embeddings"], model.encode_images(images), atol=ATOL)
    np.testing.assert_allclose(run("encode_text", captions)["embeddings"], model.encode_texts(captions), atol=ATOL)
    expected = kci.ZeroShotClassifier(model, LABELS, templates="en").scores(images)
    classified = run("classify", images)
    np.testing.assert_allclose(classified["scores"], expected, atol=ATOL)
    np.testing.assert_array_equal(classified["label_index"], expected.argmax(axis=1))
    assert texts(classified["label"]) == [LABELS[i] for i in expected.argmax(axis=1)]


def assert_asif_outputs(model, run):
    images, captions = queries()
    for endpoint, inputs, expected, embeddings in (
        ("encode_image", images, model.encode_images(images), model.image_encoder.embed(images)),
        ("encode_text", captions, model.encode_texts(captions), model.text_encoder.embed(captions)),
    ):
        outputs = run(endpoint, inputs)
        np.testing.assert_allclose(outputs["embeddings"], embeddings, atol=ATOL)
        np.testing.assert_array_equal(outputs["anchor_indices"], expected.indices)
        np.testing.assert_allclose(outputs["anchor_weights"], expected.values, atol=ATOL)
    expected = model.classify(images, labels=LABELS, templates="en")
    classified = run("classify", images)
    np.testing.assert_allclose(classified["scores"], expected.scores, atol=ATOL)
    np.testing.assert_array_equal(classified["label_index"], expected.indices)
    assert texts(classified["label"]) == expected.labels
    assert "unknown" in expected.labels and len(set(expected.labels)) > 2


def saved_model_runner(path):
    served = tf.saved_model.load(path)

    def run(endpoint, inputs):
        return {name: value.numpy() for name, value in getattr(served, endpoint)(tf.constant(inputs)).items()}

    return run


@pytest.mark.tf_parity
def test_dual_encoder_endpoints_equal_the_keras_model(dual):
    model, path, endpoints = dual
    assert endpoints == ["encode_image", "encode_tokens", "encode_text", "classify"]
    assert_dual_outputs(model, saved_model_runner(path))
    served = tf.saved_model.load(path)
    assert set(served.signatures) == set(endpoints) | {"serving_default"}
    # The signatures TF Serving calls give the same answers as the functions.
    images, captions = queries()
    by_signature = served.signatures["classify"](images=tf.constant(images))["scores"].numpy()
    np.testing.assert_allclose(by_signature, served.classify(images)["scores"].numpy(), atol=1e-6)
    tokens = model.text_encoder.tokenize(captions)
    np.testing.assert_allclose(
        served.encode_tokens(tokens)["embeddings"].numpy(), model.encode_texts(captions), atol=ATOL
    )
    metadata = json.load(open(os.path.join(path, "keras_clip_it.json")))
    assert metadata["labels"] == LABELS and metadata["image_size"] == [32, 32]
    assert metadata["embedding_dim"] == 8 and metadata["text_input"] == "strings"


@pytest.mark.tf_parity
def test_asif_endpoints_equal_the_exact_sparse_model(asif):
    model, path = asif
    assert_asif_outputs(model, saved_model_runner(path))
    metadata = json.load(open(os.path.join(path, "keras_clip_it.json")))
    assert metadata["anchors"] == 64 and metadata["k"] == 12 and metadata["anchor_dtype"] == "int8"
    assert metadata["unknown_threshold"] == model.unknown_threshold


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_asif_export_follows_the_models_centring_and_label_pooling(pooling, tmp_path):
    keras.utils.set_random_seed(0)
    model = kci.ASIF(tiny_image_encoder(), tiny_text_encoder(), k=12, p=3.0, label_pooling=pooling)
    images, captions = tiny_pairs(48)
    model.add([f"pair-{i}" for i in range(48)], images=images, captions=captions)
    path = str(tmp_path / "1")
    kci.serving.export(model, path, labels=LABELS, templates="en-short")
    queries, _ = tiny_pairs(8, seed=1)
    classified = saved_model_runner(path)("classify", queries)
    expected = model.classify(queries, labels=LABELS, templates="en-short").scores
    np.testing.assert_allclose(classified["scores"], expected, atol=ATOL)
    averaged = model.class_scores(queries, LABELS, "en-short", pooling="average")
    assert not np.allclose(expected, averaged, atol=1e-3)  # the pooling changed the scores
    metadata = json.load(open(os.path.join(path, "keras_clip_it.json")))
    assert (metadata["label_pooling"], metadata["centered"]) == (pooling, True)


TFSM_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras, numpy as np, tensorflow as tf, tensorflow_text
    jobs = json.load(open(sys.argv[1]))
    outputs = {}
    for number, (path, endpoint, inputs) in enumerate(jobs):
        layer = keras.layers.TFSMLayer(path, call_endpoint=endpoint)
        result = layer(np.load(inputs) if inputs.endswith(".npy") else tf.constant(json.load(open(inputs))))
        for name, value in result.items():
            value = np.asarray(value)
            if value.dtype == object:  # strings come back as bytes objects, which npz would pickle
                value = np.char.decode(value.astype(bytes), "utf-8")
            outputs[f"{number}/{name}"] = value
    np.savez(sys.argv[2], **outputs)
    """)


def tfsm_runner(jobs, tmp_path):
    """Runs `keras.layers.TFSMLayer` on every (path, endpoint, inputs) job and returns their outputs.

    TFSMLayer needs the TensorFlow backend: under JAX the layers run in a TensorFlow-backend subprocess.
    """
    files = []
    for number, (path, endpoint, inputs) in enumerate(jobs):
        name = str(tmp_path / f"inputs_{number}")
        if isinstance(inputs, np.ndarray):
            np.save(name + ".npy", inputs)
            files.append([path, endpoint, name + ".npy"])
        else:
            json.dump(list(inputs), open(name + ".json", "w"))
            files.append([path, endpoint, name + ".json"])
    json.dump(files, open(tmp_path / "jobs.json", "w"))
    script = tmp_path / "tfsm.py"
    script.write_text(TFSM_SCRIPT)
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "jobs.json"), str(tmp_path / "outputs.npz")],
        check=True,
        cwd=REPO,
        env={**os.environ, "KERAS_BACKEND": "tensorflow"},
        timeout=600,
    )
    saved = np.load(tmp_path / "outputs.npz", allow_pickle=False)
    results = [{} for _ in jobs]
    for key in saved.files:
        number, name = key.split("/")
        results[int(number)][name] = saved[key]
    return results


@pytest.mark.tf_parity
def test_tfsm_layer_reloads_both_models(dual, asif, tmp_path):
    images, captions = queries()
    jobs = []
    for path in (dual[1], asif[1]):
        jobs += [(path, "encode_image", images), (path, "encode_text", captions), (path, "classify", images)]
    if keras.backend.backend() == "tensorflow":
        results = [
            {
                name: np.asarray(value)
                for name, value in keras.layers.TFSMLayer(path, call_endpoint=endpoint)(tf.constant(inputs)).items()
            }
            for path, endpoint, inputs in jobs
        ]
    else:
        results = tfsm_runner(jobs, tmp_path)
    lookup = {(path, endpoint): result for (path, endpoint, _), result in zip(jobs, results)}
    assert_dual_outputs(dual[0], lambda endpoint, inputs: lookup[dual[1], endpoint])
    assert_asif_outputs(asif[0], lambda endpoint, inputs: lookup[asif[1], endpoint])


@pytest.mark.tf_parity
def test_bare_encoders_export_their_own_endpoints(tmp_path):
    image_encoder, text_encoder = tiny_image_encoder("cnn"), tiny_text_encoder()
    assert kci.serving.export(image_encoder, str(tmp_path / "image")) == ["encode_image"]
    assert kci.serving.export(text_encoder, str(tmp_path / "text")) == ["encode_tokens", "encode_text"]
    images, captions = queries()
    run = saved_model_runner(str(tmp_path / "image"))
    np.testing.assert_allclose(run("encode_image", images)["embeddings"], image_encoder.embed(images), atol=ATOL)
    run = saved_model_runner(str(tmp_path / "text"))
    np.testing.assert_allclose(run("encode_text", captions)["embeddings"], text_encoder.embed(captions), atol=ATOL)
    with pytest.raises(ValueError, match="needs a model with both towers"):
        kci.serving.export(image_encoder, str(tmp_path / "labels"), labels=LABELS)


def test_fsspec_destination_is_written_locally_then_copied(tmp_path):
    encoder = tiny_text_encoder()
    uri = "memory://kci-export-test/text/1"
    try:
        kci.serving.export(encoder, uri)
        with pytest.raises(FileExistsError, match="overwrite=True"):
            kci.serving.export(encoder, uri)
        fs = fsspec.filesystem("memory")
        fs.get("/kci-export-test/text/1", str(tmp_path / "copy"), recursive=True)
    finally:
        fsspec.filesystem("memory").rm("/kci-export-test", recursive=True)
    assert json.load(open(tmp_path / "copy" / "keras_clip_it.json"))["model"] == "TextEncoder"
    _, captions = queries()
    run = saved_model_runner(str(tmp_path / "copy"))
    np.testing.assert_allclose(run("encode_text", captions)["embeddings"], encoder.embed(captions), atol=ATOL)


class PythonWordPreprocessor(keras.layers.Layer):
    """A tokenizer in plain Python: it works on lists of strings but cannot run as a TensorFlow graph."""

    def __init__(self, vocabulary, sequence_length, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary = list(vocabulary)
        self.sequence_length = int(sequence_length)

    def __call__(self, texts):  # Keras layers take tensors; this one takes a list of str
        return self.call(texts)

    def call(self, texts):
        ids = np.zeros((len(texts), self.sequence_length), np.int32)
        for row, text in enumerate(texts):
            words = [self.vocabulary.index(w) if w in self.vocabulary else 1 for w in text.lower().split()]
            words = [2] + words[: self.sequence_length - 2] + [3]
            ids[row, : len(words)] = words
        return {"token_ids": ids, "padding_mask": (ids > 0).astype(np.int32), "segment_ids": np.zeros_like(ids)}


def test_a_tokenizer_that_cannot_run_in_a_graph_makes_encode_text_take_tokens(tmp_path):
    backbone = tiny_text_encoder().backbone
    encoder = kci.TextEncoder(backbone, PythonWordPreprocessor(VOCABULARY, 8))
    with pytest.warns(UserWarning, match="encode_text takes token inputs"):
        kci.serving.export(encoder, str(tmp_path / "text"))
    metadata = json.load(open(tmp_path / "text" / "keras_clip_it.json"))
    assert metadata["text_input"] == "tokens"
    served = tf.saved_model.load(str(tmp_path / "text"))
    _, captions = queries()
    tokens = encoder.tokenize(captions)
    np.testing.assert_allclose(served.encode_text(tokens)["embeddings"].numpy(), encoder.embed(captions), atol=ATOL)


def test_bad_images_get_errors_that_say_what_to_send(dual):
    served = tf.saved_model.load(dual[1])
    for endpoint in ("encode_image", "classify"):
        signature = served.signatures[endpoint]
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"images must be uint8 \(N, 32, 32, 3\)"):
            signature(images=tf.zeros((2, 31, 32, 3), tf.uint8))
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"images must be uint8 \(N, 32, 32, 3\)"):
            signature(images=tf.zeros((2, 32, 32), tf.uint8))
        assert signature(images=tf.zeros((0, 32, 32, 3), tf.uint8))[
            "embeddings" if endpoint == "encode_image" else "scores"
        ].shape == (0, 8 if endpoint == "encode_image" else len(LABELS))
    with pytest.raises(TypeError, match="uint8"):
        served.encode_image(tf.zeros((1, 32, 32, 3), tf.float32))
    assert served.encode_text(tf.constant([], tf.string))["embeddings"].shape == (0, 8)


def test_export_arguments_are_checked(dual, tmp_path):
    model = dual[0]
    with pytest.raises(TypeError, match="cannot export a Sequential"):
        kci.serving.export(keras.Sequential([keras.layers.Dense(2)]), str(tmp_path / "a"))
    with pytest.raises(TypeError, match="single string"):
        kci.serving.export(model, str(tmp_path / "a"), labels="cat")
    with pytest.raises(ValueError, match="labels is empty"):
        kci.serving.export(model, str(tmp_path / "a"), labels=[])
    with pytest.raises(TypeError, match="labels must be strings"):
        kci.serving.export(model, str(tmp_path / "a"), labels=["cat", 3])
    with pytest.raises(ValueError, match="templates= was given without labels="):
        kci.serving.export(model, str(tmp_path / "a"), templates="it")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        kci.serving.export(model, dual[1])
    with pytest.raises(ValueError, match="no anchors"):
        kci.serving.export(kci.ASIF(model.image_encoder, model.text_encoder), str(tmp_path / "a"))
    from tests.models.test_asif import VectorEncoder

    with pytest.raises(TypeError, match="only kci.ImageEncoder and kci.TextEncoder"):
        kci.serving.export(kci.ASIF(VectorEncoder(4), model.text_encoder), str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a")


# One export of the real towers: converting EfficientNet-Lite0 and MiniLM (jax2tf) and saving them is
# most of this test's time. ASIF's endpoints hold everything a DualEncoder's hold (both towers, the
# tokenizer in the graph, classify) and compare exact top-k anchor indices of real embeddings; the
# projection heads a DualEncoder adds on top are checked by test_dual_encoder_endpoints_equal_the_keras_model.
@pytest.mark.slow
def test_real_offline_encoders_export_for_asif(tmp_path):
    image_encoder = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
    text_encoder = kci.TextEncoder.from_preset("all_minilm_l6_v2")
    ids, images, captions = kci.datasets.emoji_pairs(lang="en", split="test", return_ids=True)
    asif = kci.ASIF(image_encoder, text_encoder, k=32, p=8.0)
    asif.add(ids[:96], images=images[:96], captions=captions[:96])
    labels = ["a face", "an animal", "a flag", "food"]
    kci.serving.export(asif, str(tmp_path / "asif"), labels=labels, templates="en")
    served = tf.saved_model.load(str(tmp_path / "asif"))
    queries_ = image_encoder.preprocess(images[96:104])
    np.testing.assert_allclose(
        served.encode_image(queries_)["embeddings"].numpy(), image_encoder.embed(queries_), atol=ATOL
    )
    expected = asif.encode_images(queries_)
    outputs = served.encode_image(queries_)
    np.testing.assert_array_equal(outputs["anchor_indices"].numpy(), expected.indices)
    np.testing.assert_allclose(outputs["anchor_weights"].numpy(), expected.values, atol=ATOL)
    outputs = served.encode_text(tf.constant(captions[96:104]))
    np.testing.assert_allclose(outputs["embeddings"].numpy(), text_encoder.embed(captions[96:104]), atol=ATOL)
    expected = asif.encode_texts(captions[96:104])
    np.testing.assert_array_equal(outputs["anchor_indices"].numpy(), expected.indices)
    np.testing.assert_allclose(outputs["anchor_weights"].numpy(), expected.values, atol=ATOL)
    expected = asif.classify(queries_, labels=labels, templates="en")
    np.testing.assert_allclose(served.classify(queries_)["scores"].numpy(), expected.scores, atol=ATOL)
