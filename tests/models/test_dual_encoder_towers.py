"""Tiny random towers shared by the dual-encoder, loss, callback, data and distributed tests.

They are small enough that a training step takes milliseconds, yet real keras-hub backbones (ViT, BERT)
and a batch-norm CNN, so locking, saving and compilation are exercised on the real layer types.
"""

import keras
import keras_hub
import numpy as np

import keras_clip_it as kci
from keras_clip_it.models.dual_encoder import layer_groups

WORDS = "a an the red blue green yellow big small cat dog fish bird car tree house sun moon star".split()
VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
IMAGE_SIZE = 32


def tiny_image_encoder(kind="vit"):
    """A 32x32 image tower: a 2-block ViT (cls pooling) or a conv + batch-norm CNN (avg pooling)."""
    if kind == "vit":
        backbone = keras_hub.models.ViTBackbone(
            image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
            mlp_dim=32,
        )
        return kci.ImageEncoder(backbone, image_size=IMAGE_SIZE, crop_pct=1.0, pooling="cls")
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(16, 3, strides=2, name="block")(x)
    x = keras.layers.BatchNormalization(name="block_bn")(x)
    backbone = keras.Model(inputs, keras.layers.ReLU()(x))
    return kci.ImageEncoder(backbone, image_size=IMAGE_SIZE, crop_pct=1.0, pooling="avg")


def tiny_text_encoder(sequence_length=8):
    """A 2-layer BERT with a word-level vocabulary, mean pooling."""
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCABULARY)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=sequence_length)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCABULARY), num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=sequence_length, dropout=0.0,
    )
    return kci.TextEncoder(backbone, preprocessor, pooling="mean")


def tiny_model(image="vit", **kwargs):
    kwargs.setdefault("projection_dim", 8)
    return kci.DualEncoder(tiny_image_encoder(image), tiny_text_encoder(), **kwargs)


def tiny_pairs(count=16, seed=0):
    """`count` (image, caption) pairs where the caption names the image's dominant colour and a shape."""
    rng = np.random.RandomState(seed)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}
    things = ["cat", "dog", "fish", "bird", "car", "tree", "house", "sun"]
    images, captions = [], []
    for index in range(count):
        colour = list(colours)[index % 4]
        thing = things[(index // 4) % len(things)]
        image = rng.randint(0, 60, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.int32)
        image[:, :] += np.array(colours[colour]) // 2
        row = 4 * ((index // 4) % 8)
        image[row:row + 4, :] = 255
        images.append(np.clip(image, 0, 255).astype(np.uint8))
        captions.append(f"a {colour} {thing}")
    return np.stack(images), captions


def tokenized_batch(model, count=8, seed=0):
    images, captions = tiny_pairs(count, seed)
    return {"images": images, "texts": model.text_encoder.tokenize(captions)}


def test_layer_groups_follow_blocks():
    vit = tiny_image_encoder("vit").backbone
    names = [type(group).__name__ for group in layer_groups(vit)]
    assert names == ["ViTPatchingAndEmbedding", "ViTEncoderBlock", "ViTEncoderBlock", "LayerNormalization"]
    bert = tiny_text_encoder().backbone
    names = [group.name for group in layer_groups(bert)]
    assert names[-3:] == ["transformer_layer_0", "transformer_layer_1", "pooled_dense"]
