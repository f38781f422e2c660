"""CLIP from scratch on the embedded emoji pairs: a small ViT and a small text transformer, both trained.

Nothing is pretrained: the image tower is a 4-block ViT on 64x64 pixels (keras-hub's ViTBackbone), the
text tower a 4-block transformer encoder (keras-hub layers) over a WordPiece vocabulary learned from the
training captions, as CLIP learned its tokenizer on its own data. Both are projected into one 256-d space
and trained with the symmetric contrastive loss through plain `model.fit`. The held-out emoji (and
their names) are never seen in training: each test image must find its own caption among all the test
captions, and each caption its image.

    python recipes/train_clip.py --lang it
    python recipes/train_clip.py --backend tensorflow --distribution data-parallel --cpu-devices 2
    python recipes/train_clip.py --quick        # a few steps, to check that everything runs

Prints held-out recall@1/5/10 both ways and writes benchmarks/results/train_clip_<lang>.json.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import common  # noqa: E402

IMAGE_SIZE = 64
SEQUENCE_LENGTH = 16
WIDTH = 128
RESERVED_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

args = common.parse_args(__doc__, epochs=30, batch_size=64, learning_rate=1e-3)
common.set_backend(args)  # before Keras is imported

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_clip_it as kci  # noqa: E402


def image_tower():
    """A small ViT: 16x16 patches of a 64x64 image (16 tokens), 4 pre-norm blocks of width 128, mean-pooled."""
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
        patch_size=16,
        num_layers=4,
        num_heads=4,
        hidden_dim=WIDTH,
        mlp_dim=2 * WIDTH,
        dropout_rate=0.1,
    )
    # The emoji are drawn at 128 px: resize (no crop) to the tower's 64 px, pixels scaled to [-1, 1].
    return kci.ImageEncoder(backbone, image_size=IMAGE_SIZE, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0,
                            resample="bilinear", pooling="avg")


def text_tower(captions):
    """A small transformer encoder over a WordPiece vocabulary learned from `captions`, mean-pooled."""
    import tensorflow as tf  # the vocabulary learner reads a tf.data.Dataset (a list would be file names)

    vocabulary = keras_hub.tokenizers.compute_word_piece_vocabulary(
        tf.data.Dataset.from_tensor_slices(captions), vocabulary_size=2000, lowercase=True,
        reserved_tokens=RESERVED_TOKENS,
    )
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=SEQUENCE_LENGTH)

    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    x = keras_hub.layers.TokenAndPositionEmbedding(len(vocabulary), SEQUENCE_LENGTH, WIDTH)(token_ids)
    for _ in range(4):
        x = keras_hub.layers.TransformerEncoder(2 * WIDTH, num_heads=4, dropout=0.1, normalize_first=True)(
            x, padding_mask=padding_mask
        )
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    backbone = keras.Model({"token_ids": token_ids, "padding_mask": padding_mask}, x, name="text_transformer")
    return kci.TextEncoder(backbone, preprocessor, pooling="mean")


keras.utils.set_random_seed(args.seed)
distribution = common.distribution(args)
timer = common.Timer()
train_images, train_captions = common.emoji_split(kci, args.lang, "train", args.quick)
test_images, test_captions = common.emoji_split(kci, args.lang, "test", args.quick)
epochs = 2 if args.quick else args.epochs

with distribution.scope():
    model = kci.DualEncoder(image_tower(), text_tower(train_captions), projection_dim=256)
    steps = epochs * (len(train_captions) // args.batch_size)
    # Linear warm-up over the first 10% of the steps, then cosine decay: the usual CLIP schedule.
    learning_rate = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=steps - steps // 10, warmup_target=args.learning_rate, warmup_steps=steps // 10
    )
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=0.1))

# Resize once to the tower's size: kci.data.pairs then slices the arrays instead of decoding per epoch.
pairs = kci.data.pairs(model.image_encoder.preprocess(train_images), train_captions, model=model,
                       batch_size=args.batch_size, seed=args.seed)
with timer("fit"):
    history = model.fit(pairs, epochs=epochs, verbose=2)
with timer("evaluate"):
    metrics = kci.evaluate(model, test_images, test_captions)

common.report(
    "clip", args, distribution, metrics, len(test_captions),
    train_pairs=len(train_captions),
    parameters=int(sum(np.prod(v.shape) for v in model.trainable_variables)),
    vocabulary_size=model.text_encoder.preprocessor.tokenizer.vocabulary_size(),
    logit_scale=round(float(keras.ops.convert_to_numpy(model.logit_scale)), 2),
    history=common.history_summary(history),
    seconds=timer.seconds,
)
