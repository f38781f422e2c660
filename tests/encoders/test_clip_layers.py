"""kci's CLIP towers compute keras-hub's CLIP towers' function from the same weights, and save and reload."""

import keras
import keras_hub
import numpy as np
import pytest

from keras_clip_it.encoders.clip.clip_layers import CLIPBlock
from keras_clip_it.encoders.clip.clip_towers import CLIPTextTower
from keras_clip_it.encoders.clip.clip_towers import CLIPVisionTower
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
    # A bare tower is a custom Keras layer like any other: the loading process imports its module.
    reloaded = assert_keras_roundtrip(tower, lambda m: m({"token_ids": token_ids}), tmp_path / "text",
                                      imports=["keras_clip_it.encoders.clip.clip_towers"])
    assert reloaded.encoder_layers[0].layer_norm_1.epsilon == 1e-3
    vision = CLIPVisionTower(8, WIDTH, image_shape=(16, 16, 3), dtype="mixed_bfloat16", **SIZES)
    output = vision(np.zeros((2, 16, 16, 3), "float32"))
    assert keras.backend.standardize_dtype(output.dtype) == "bfloat16"
    assert all(w.dtype == "float32" for w in vision.weights)
    assert np.isfinite(np.asarray(keras.ops.cast(output, "float32"))).all()


def test_towers_call_at_equals_their_sequence_at_the_pooled_tokens():
    """The last block computed only at the pooled token gives that token's features, through the encoders too."""
    vision = CLIPVisionTower(8, WIDTH, image_shape=(32, 32, 3), **SIZES)
    text = CLIPTextTower(50, WIDTH, WIDTH, max_sequence_length=10, **SIZES)
    _randomise(vision, 10)
    _randomise(text, 11)
    images = np.random.RandomState(12).normal(0, 1, (3, 32, 32, 3)).astype("float32")
    token_ids = np.random.RandomState(13).randint(1, 50, (3, 10)).astype("int32")
    positions = np.array([9, 0, 4], "int32")
    rows = np.arange(3)
    np.testing.assert_allclose(np.asarray(vision.call_at(images, positions)), np.asarray(vision(images))[rows, positions],
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(text.call_at({"token_ids": token_ids}, positions)),
                               np.asarray(text({"token_ids": token_ids}))[rows, positions], atol=1e-5)
    # Causal: what follows the kept token does not change it.
    changed = token_ids.copy()
    changed[1, 1:] = 7
    np.testing.assert_allclose(np.asarray(text.call_at({"token_ids": changed}, positions))[1],
                               np.asarray(text.call_at({"token_ids": token_ids}, positions))[1], atol=1e-6)

    from keras_clip_it.encoders.image_encoder import ImageEncoder
    from keras_clip_it.encoders.text_encoder import TextEncoder

    encoder = ImageEncoder(vision, image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0,
                           pooling="cls")
    pixels = np.random.RandomState(14).randint(0, 256, (3, 32, 32, 3)).astype("uint8")
    normalised = (pixels.astype("float32") / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(np.asarray(encoder(pixels)), np.asarray(vision(normalised))[:, 0], atol=1e-5)
    lengths = np.array([10, 1, 6])
    padding_mask = (np.arange(10)[None] < lengths[:, None]).astype("int32")
    inputs = {"token_ids": token_ids * padding_mask, "padding_mask": padding_mask}
    text_encoder = TextEncoder(text, preprocessor=None, pooling="last")
    np.testing.assert_allclose(np.asarray(text_encoder(inputs)),
                               np.asarray(text({"token_ids": inputs["token_ids"]}))[rows, lengths - 1], atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="compares JAX gradients")
def test_call_at_gradients_equal_the_full_sequence_gradients():
    import jax

    tower = CLIPTextTower(50, WIDTH, WIDTH, max_sequence_length=10, **SIZES)
    _randomise(tower, 15)
    weights = [v.value for v in tower.trainable_variables]
    token_ids = np.random.RandomState(16).randint(1, 50, (3, 10)).astype("int32")
    positions = np.array([9, 2, 5], "int32")

    def pooled(weights, at):
        with keras.StatelessScope(state_mapping=list(zip(tower.trainable_variables, weights))):
            if at:
                features = tower.call_at({"token_ids": token_ids}, positions)
            else:
                features = tower({"token_ids": token_ids})[np.arange(3), positions]
        return keras.ops.sum(features * np.linspace(-1, 1, WIDTH, dtype="float32"))

    ours = jax.grad(pooled)(weights, True)
    want = jax.grad(pooled)(weights, False)
    for mine, other in zip(ours, want):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(other), atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the custom weight gradient is JAX's")
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_block_gradients_equal_plain_dense_gradients(monkeypatch, policy):
    import jax

    from keras_clip_it.encoders.clip import clip_layers

    block = CLIPBlock(hidden_dim=WIDTH, num_heads=4, intermediate_dim=3 * WIDTH, dtype=policy)
    block.build((None, 5, WIDTH))
    _randomise(block, 4)
    weights = [v.value for v in block.trainable_variables]
    x = np.random.RandomState(6).normal(0, 1, (3, 5, WIDTH)).astype("float32")
    cotangent = np.random.RandomState(7).normal(0, 1, (3, 5, WIDTH)).astype("float32")

    def gradients():
        def forward(weights, x):
            return keras.ops.cast(block.stateless_call(weights, [], x)[0], "float32")

        return jax.vjp(forward, weights, x)[1](cotangent)

    ours = gradients()
    assert block.dense_2.kernel.shape[0] > block.dense_2.kernel.shape[1]  # the narrowing projection's own path
    monkeypatch.setattr(clip_layers, "dense_2d", lambda layer, x: layer(x))
    plain = gradients()
    tolerance = 1e-5 if policy == "float32" else 2e-2
    for mine, want in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(plain)):
        assert mine.dtype == want.dtype
        scale = float(np.max(np.abs(np.asarray(want, "float32")))) + 1e-6
        np.testing.assert_allclose(np.asarray(mine, "float32") / scale, np.asarray(want, "float32") / scale,
                                   atol=tolerance)


@pytest.mark.parametrize("change", ["int8", "activation"])
def test_narrowing_projection_keeps_the_layers_own_call_when_quantized_or_activated(change):
    from keras_clip_it.encoders.clip.clip_layers import dense_2d

    layer = keras.layers.Dense(4, activation="relu" if change == "activation" else None)
    layer.build((None, 16))
    layer.set_weights([np.random.RandomState(8).normal(0, 1, (16, 4)).astype("float32"), np.full(4, 0.1, "float32")])
    if change == "int8":
        layer.quantize("int8")
    x = np.random.RandomState(9).normal(0, 1, (6, 16)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(dense_2d(layer, x)), keras.ops.convert_to_numpy(layer(x)),
                               rtol=1e-6, atol=1e-6)


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        CLIPBlock(hidden_dim=30, num_heads=4, intermediate_dim=8)
    with pytest.raises(ValueError, match="intermediate_activation"):
        CLIPBlock(hidden_dim=32, num_heads=4, intermediate_dim=8, intermediate_activation="swish")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        CLIPVisionTower(7, WIDTH, image_shape=(32, 32, 3), **SIZES)


def _clip_dual_encoder():
    import keras_clip_it as kci
    from keras_clip_it.encoders.text_preprocessor import TextPreprocessor

    vision = CLIPVisionTower(8, WIDTH, image_shape=(16, 16, 3), **SIZES)
    text = CLIPTextTower(50, WIDTH, WIDTH, max_sequence_length=8, **SIZES)
    image_encoder = kci.ImageEncoder(vision, image_size=16, crop_pct=1.0, pooling="cls")
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "gatto"])
    text_encoder = kci.TextEncoder(text, TextPreprocessor(tokenizer, 8, end_token=3), pooling="last")
    return kci.DualEncoder(image_encoder, text_encoder, projection_dim=16)


def _pairs(count=8):
    rng = np.random.RandomState(5)
    lengths = rng.randint(2, 9, count)
    token_ids = np.zeros((count, 8), "int32")
    for row, length in enumerate(lengths):
        token_ids[row, :length] = rng.randint(4, 50, length)
    return {
        "images": rng.randint(0, 256, (count, 16, 16, 3)).astype("uint8"),
        "texts": {"token_ids": token_ids, "padding_mask": (np.arange(8)[None] < lengths[:, None]).astype("int32")},
    }


@pytest.mark.slow
def test_dual_encoder_on_clip_towers_trains_locks_and_saves(tmp_path):
    keras.utils.set_random_seed(0)
    model = _clip_dual_encoder()
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=3e-3))
    traces = []
    train_step = model.train_step
    model.train_step = lambda *args: traces.append(1) or train_step(*args)
    batch = _pairs()
    history = model.fit(batch, batch_size=8, epochs=2, verbose=0).history["loss"]
    traced = len(traces)
    history += model.fit(batch, batch_size=8, epochs=13, verbose=0).history["loss"]
    assert history[-1] < 0.5 * history[0]  # eight pairs are learned: the step trains both towers
    assert len(traces) == traced  # no retrace once training runs
    model.lock("image", unlocked_groups=1)  # the final layer norm of the vision tower only
    trainable = {id(v) for v in model.trainable_variables}
    assert all(id(v) in trainable for v in model.image_encoder.backbone.layer_norm.weights)
    assert not any(id(v) in trainable for v in model.image_encoder.backbone.encoder_layers[-1].weights)
    model.unlock("image")
    texts = batch["texts"]
    assert_keras_roundtrip(model, lambda m: m.predict_on_batch({"texts": texts})["text_embeddings"], tmp_path)


def test_dual_encoder_on_clip_towers_under_mixed_bfloat16():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(1)
        model = _clip_dual_encoder()
        model.compile()
        batch = _pairs()
        outputs = model(batch, training=True)
        loss = model.compute_loss(batch, None, outputs)
        assert keras.backend.standardize_dtype(loss.dtype) == "float32"
        assert np.isfinite(float(loss))
        assert all(w.dtype == "float32" for w in model.weights)
    finally:
        keras.config.set_dtype_policy("float32")
