"""kci's CLIP towers compute keras-hub's CLIP towers' function from the same weights, and save and reload."""

import keras
import keras_hub
import numpy as np
import pytest

from keras_clip_it.encoders.clip_layers import CLIPBlock
from keras_clip_it.encoders.hf_clip import CLIPTextTower
from keras_clip_it.encoders.hf_clip import CLIPVisionTower
from tests.helpers import assert_keras_roundtrip

SIZES = dict(num_layers=2, num_heads=4, intermediate_dim=48)
WIDTH = 32


def _copy_block(theirs, ours):
    """keras-hub's CLIPEncoderLayer weights into a CLIPBlock (q, k, v fused into one projection)."""
    attention = theirs.attention
    dense = [attention.query_dense, attention.key_dense, attention.value_dense]
    ours.qkv_dense.kernel.assign(np.concatenate([np.reshape(d.kernel, (WIDTH, WIDTH)) for d in dense], axis=1))
    ours.qkv_dense.bias.assign(np.concatenate([np.reshape(d.bias, (WIDTH,)) for d in dense]))
    ours.output_dense.kernel.assign(np.reshape(attention.output_dense.kernel, (WIDTH, WIDTH)))
    ours.output_dense.bias.assign(attention.output_dense.bias)
    for name in ("layer_norm_1", "layer_norm_2", "dense_1", "dense_2"):
        for mine, other in zip(getattr(ours, name).weights, getattr(theirs, name).weights):
            mine.assign(other)


def _randomise(model, seed):
    rng = np.random.RandomState(seed)
    for variable in model.weights:
        if variable.dtype.startswith("float"):
            variable.assign(rng.normal(0, 0.2, variable.shape).astype(variable.dtype))


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_vision_tower_equals_keras_hub(activation):
    theirs = keras_hub.models.CLIPVisionEncoder(
        patch_size=8, hidden_dim=WIDTH, image_shape=(32, 32, 3), intermediate_activation=activation, **SIZES
    )
    _randomise(theirs, 0)
    theirs.embedding.position_ids.assign(np.arange(17)[None])  # keras-hub initialises the position ids to 0
    ours = CLIPVisionTower(8, WIDTH, image_shape=(32, 32, 3), intermediate_activation=activation, **SIZES)
    ours.embedding.patch_kernel.assign(theirs.embedding.patch_embedding.kernel)
    ours.embedding.class_embedding.assign(theirs.embedding.class_embedding)
    ours.embedding.position_embedding.assign(theirs.embedding.position_embedding.embeddings)
    for mine, other in [(ours.pre_layer_norm, theirs.pre_layer_norm), (ours.layer_norm, theirs.layer_norm)]:
        mine.gamma.assign(other.gamma)
        mine.beta.assign(other.beta)
    for mine, other in zip(ours.encoder_layers, theirs.encoder_layers):
        _copy_block(other, mine)
    assert len(ours.weights) == len(theirs.weights) - 1 - 2 * 2 * SIZES["num_layers"]  # no position ids; fused qkv
    images = np.random.RandomState(1).normal(0, 1, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(ours(images)), np.asarray(theirs(images)), atol=1e-5)


def test_text_tower_equals_keras_hub():
    theirs = keras_hub.models.CLIPTextEncoder(
        vocabulary_size=50, embedding_dim=WIDTH, hidden_dim=WIDTH, max_sequence_length=10, **SIZES
    )
    _randomise(theirs, 2)
    theirs.layer_norm.epsilon = 1e-5  # keras-hub's final norm uses 1e-6, CLIP 1e-5
    ours = CLIPTextTower(50, WIDTH, WIDTH, max_sequence_length=10, **SIZES)
    for mine, other in zip(ours.embedding.weights, theirs.embedding.weights):
        mine.assign(other)
    ours.layer_norm.gamma.assign(theirs.layer_norm.gamma)
    ours.layer_norm.beta.assign(theirs.layer_norm.beta)
    for mine, other in zip(ours.encoder_layers, theirs.encoder_layers):
        _copy_block(other, mine)
    token_ids = np.random.RandomState(3).randint(0, 50, (4, 10)).astype("int32")
    want = np.asarray(theirs({"token_ids": token_ids}))
    np.testing.assert_allclose(np.asarray(ours({"token_ids": token_ids})), want, atol=1e-5)
    # Causal: a token's output does not depend on later tokens.
    changed = token_ids.copy()
    changed[:, 6:] = (changed[:, 6:] + 1) % 50
    np.testing.assert_allclose(np.asarray(ours({"token_ids": changed}))[:, :6], want[:, :6], atol=1e-5)


def test_towers_roundtrip_and_mixed_precision(tmp_path):
    tower = CLIPTextTower(50, WIDTH, WIDTH, max_sequence_length=10, layer_norm_epsilon=1e-3, **SIZES)
    token_ids = np.arange(20, dtype="int32").reshape(2, 10)
    reloaded = assert_keras_roundtrip(tower, lambda m: m({"token_ids": token_ids}), tmp_path / "text")
    assert reloaded.encoder_layers[0].layer_norm_1.epsilon == 1e-3
    vision = CLIPVisionTower(8, WIDTH, image_shape=(16, 16, 3), dtype="mixed_bfloat16", **SIZES)
    output = vision(np.zeros((2, 16, 16, 3), "float32"))
    assert keras.backend.standardize_dtype(output.dtype) == "bfloat16"
    assert all(w.dtype == "float32" for w in vision.weights)
    assert np.isfinite(np.asarray(keras.ops.cast(output, "float32"))).all()


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        CLIPBlock(hidden_dim=30, num_heads=4, intermediate_dim=8)
    with pytest.raises(ValueError, match="intermediate_activation"):
        CLIPBlock(hidden_dim=32, num_heads=4, intermediate_dim=8, intermediate_activation="swish")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        CLIPVisionTower(7, WIDTH, image_shape=(32, 32, 3), **SIZES)
