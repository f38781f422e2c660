"""LiT on the embedded emoji pairs: a locked, pretrained image tower teaches a text tower to read it.

LiT ("Locked-image Tuning", Zhai et al. 2022): the image tower (EfficientNet-Lite0, ImageNet) is
frozen, batch norm included; the text tower (all-MiniLM-L6-v2 for English, multilingual-e5-small for
Italian) and both projection heads are trained with the contrastive loss, so the text side learns to
point at what the image features already separate. The token embeddings stay frozen too: a quarter of
the held-out captions' words never occur in training, and frozen embeddings keep those words where the
pretrained transformer expects them.

Because the image tower is locked, its features are the same in every epoch: they are computed once
(and cached across runs) and training feeds them in place of pixels, through a `DualEncoder` whose image
tower is a `CachedFeatures` stand-in (keras_clip_it/models/feature_cache.py). A linear projection
without bias followed by L2 normalisation does not care about the scale of its input, so the cached
(normalised) features give exactly the embeddings of the real tower. After `fit`, the trained heads move
into the real model (EfficientNet-Lite0 + the trained text tower), which is checked against the training
model on real test images and can be saved and served. The tower runs at the emoji's own 128 px: 224 px
would only upsample the drawings, at three times the cost.

Beside it, ASIF with the same frozen towers on the same split: what the pairs give without training.

    python recipes/train_lit.py --lang it
    python recipes/train_lit.py --backend tensorflow --distribution data-parallel --cpu-devices 2
    python recipes/train_lit.py --quick        # a few steps, to check that everything runs

Prints held-out recall@1/5/10 both ways and writes benchmarks/results/train_lit_<lang>.json.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import common  # noqa: E402

IMAGE_SIZE = 128

args = common.parse_args(__doc__, epochs=5, batch_size=64, learning_rate=1e-4, extra=common.text_groups_option)
common.set_backend(args)  # before Keras is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_clip_it as kci  # noqa: E402
from keras_clip_it.models.feature_cache import CachedFeatures  # noqa: E402
from keras_clip_it.models.feature_cache import cached_features  # noqa: E402
from keras_clip_it.models.feature_cache import copy_heads  # noqa: E402
from keras_clip_it.models.feature_cache import feature_pairs  # noqa: E402

keras.utils.set_random_seed(args.seed)
distribution = common.distribution(args)
timer = common.Timer()
train_images, train_captions = common.emoji_split(kci, args.lang, "train", args.quick)
test_images, test_captions = common.emoji_split(kci, args.lang, "test", args.quick)
epochs = 1 if args.quick else args.epochs

# The towers. The real model is what a user keeps: it takes pixels.
image_encoder = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet", image_size=IMAGE_SIZE)
text_encoder = kci.TextEncoder.from_preset(common.TEXT_PRESETS[args.lang])
common.shorten_sequences(text_encoder, train_captions)
text_groups = common.text_groups_to_train(text_encoder, args.text_unlocked_groups)
with distribution.scope():
    model = kci.DualEncoder(image_encoder, text_encoder, projection_dim=256)
    model.lock("image")
    model.lock("text", unlocked_groups=text_groups)

# The locked tower's features, once for the whole run.
with timer("image features"):
    key = f"emoji_{IMAGE_SIZE}px_{len(train_images)}_{len(test_images)}"
    features = cached_features(image_encoder, np.concatenate([train_images, test_images]), key)
    train_features, test_features = features[: len(train_images)], features[len(train_images):]

# The training model: the same text tower, fed cached image features.
with distribution.scope():
    trainer = kci.DualEncoder(CachedFeatures(image_encoder.embedding_dim), text_encoder, projection_dim=256)
    trainer.lock("text", unlocked_groups=text_groups)
    steps = epochs * (len(train_captions) // args.batch_size)
    learning_rate = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=steps - steps // 10, warmup_target=args.learning_rate, warmup_steps=steps // 10
    )
    trainer.compile(optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=0.1))
pairs = feature_pairs(train_features, text_encoder.tokenize(train_captions), args.batch_size, args.seed)
with timer("fit"):
    history = trainer.fit(pairs, epochs=epochs, verbose=2)

# Move the trained heads into the real model, and check it on real test images.
copy_heads(trainer, model)
with timer("evaluate"):
    text_embeddings = model.encode_texts(test_captions)
    image_embeddings = trainer.encode_images(list(test_features))
    check = slice(0, 8)
    np.testing.assert_allclose(model.encode_images(test_images[check]), image_embeddings[check], atol=2e-3)
    metrics = kci.metrics.retrieval_metrics(image_embeddings @ text_embeddings.T, np.arange(len(test_captions)))

# ASIF on the same split, with the same frozen image features and the frozen pretrained text tower.
with timer("asif"):
    frozen_text = kci.TextEncoder.from_preset(common.TEXT_PRESETS[args.lang])
    # The paper's k and p, fixed here so runs stay comparable; recipes/asif_emoji.py tunes them on validation.
    asif = kci.ASIF(image_encoder, frozen_text, k=min(800, len(train_captions)), p=8)
    asif.add([f"train-{i}" for i in range(len(train_captions))], image_embeddings=train_features,
             text_embeddings=frozen_text.embed(train_captions))
    scores = asif.similarity(asif.encode_images(embeddings=test_features),
                             asif.encode_texts(embeddings=frozen_text.embed(test_captions)))
    asif_metrics = kci.metrics.retrieval_metrics(scores, np.arange(len(test_captions)))
    print(f"ASIF (k={asif.k}, p={asif.p:g}), same towers and split: image -> caption R@1 "
          f"{asif_metrics['image_to_text_R@1']:.3f}, R@5 {asif_metrics['image_to_text_R@5']:.3f}, "
          f"R@10 {asif_metrics['image_to_text_R@10']:.3f}")

common.report(
    "lit", args, distribution, metrics, len(test_captions),
    train_pairs=len(train_captions),
    image_encoder=f"efficientnet_lite0_imagenet at {IMAGE_SIZE} px (locked)",
    text_encoder=common.TEXT_PRESETS[args.lang],
    sequence_length=text_encoder.sequence_length,
    text_unlocked_groups=text_groups,
    parameters=int(sum(np.prod(v.shape) for v in trainer.trainable_variables)),
    logit_scale=round(float(keras.ops.convert_to_numpy(model.logit_scale)), 2),
    asif={"k": asif.k, "p": asif.p, "metrics": {name: round(value, 4) for name, value in asif_metrics.items()}},
    history=common.history_summary(history),
    seconds=timer.seconds,
)
