"""The CLIP-Italian schedule on the embedded emoji pairs: heads first on frozen towers, then everything.

CLIP-Italian (Bianchi et al. 2021) joined two pretrained towers with new, randomly initialised
projection heads. Training everything at once lets the first large, random updates wreck the pretrained
features, so training runs in two phases, here in one `fit` call with `kci.callbacks.UnlockTowers`:

1. epochs before `--unlock-epoch`: both backbones frozen (batch norm on its ImageNet statistics), only
   the heads learn, at `--learning-rate`;
2. from `--unlock-epoch` on: the towers are unlocked and the whole model trains at the lower
   `--unlock-learning-rate` (the training step is rebuilt for the new set of trainable weights).

As in CLIP-Italian the temperature is fixed (20) rather than learned. The towers are EfficientNet-Lite0
(ImageNet) at the emoji's own 128 px and multilingual-e5-small; the captions are Italian (or English
with --lang en: the text tower is multilingual). The token embeddings of e5 (250k rows, 80% of its
weights) stay frozen in phase 2: the held-out captions hold words never seen in training, and frozen
embeddings keep those words where the pretrained transformer expects them. On a CPU,
`--text-unlocked-groups 4` trains only e5's top 4 of 12 blocks in phase 2, which halves the cost of a step.

    python recipes/train_clip_italian.py
    python recipes/train_clip_italian.py --backend tensorflow --distribution data-parallel --cpu-devices 2
    python recipes/train_clip_italian.py --quick        # a few steps, to check that everything runs

Prints held-out recall@1/5/10 both ways and writes benchmarks/results/train_clip_italian_<lang>.json.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import common  # noqa: E402

IMAGE_SIZE = 128


def schedule_options(parser):
    parser.add_argument("--unlock-epoch", type=int, default=1, help="first epoch (0-based) of phase 2")
    parser.add_argument("--unlock-learning-rate", type=float, default=2e-5, help="the phase-2 learning rate")
    common.text_groups_option(parser)


args = common.parse_args(__doc__, epochs=2, batch_size=64, learning_rate=1e-3, lang="it", extra=schedule_options)
common.set_backend(args)  # before Keras is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_clip_it as kci  # noqa: E402

keras.utils.set_random_seed(args.seed)
distribution = common.distribution(args)
timer = common.Timer()
train_images, train_captions = common.emoji_split(kci, args.lang, "train", args.quick)
test_images, test_captions = common.emoji_split(kci, args.lang, "test", args.quick)
epochs, unlock_epoch = (2, 1) if args.quick else (args.epochs, args.unlock_epoch)

image_encoder = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet", image_size=IMAGE_SIZE)
text_encoder = kci.TextEncoder.from_preset("multilingual_e5_small")
common.shorten_sequences(text_encoder, train_captions)
with distribution.scope():
    model = kci.DualEncoder(image_encoder, text_encoder, projection_dim=256, logit_scale=20.0,
                            learn_logit_scale=False)
    model.compile(optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=0.1))

text_groups = common.text_groups_to_train(text_encoder, args.text_unlocked_groups)
schedule = [
    # Phase 1 locks both towers; phase 2 unlocks the image tower entirely and the text tower above its
    # token embeddings. Both callbacks switch at the same epoch, to the same learning rate.
    kci.callbacks.UnlockTowers(unlock_epoch, args.unlock_learning_rate, towers="image"),
    kci.callbacks.UnlockTowers(unlock_epoch, args.unlock_learning_rate, towers="text", unlocked_groups=text_groups),
]
# Resize once to the tower's size: kci.data.pairs then slices the arrays instead of decoding per epoch.
pairs = kci.data.pairs(image_encoder.preprocess(train_images), train_captions, model=model,
                       batch_size=args.batch_size, seed=args.seed)
with timer("fit"):
    history = model.fit(pairs, epochs=epochs, callbacks=schedule, verbose=2)
with timer("evaluate"):
    metrics = kci.evaluate(model, test_images, test_captions)

common.report(
    "clip_italian", args, distribution, metrics, len(test_captions),
    train_pairs=len(train_captions),
    image_encoder=f"efficientnet_lite0_imagenet at {IMAGE_SIZE} px",
    text_encoder="multilingual_e5_small",
    sequence_length=text_encoder.sequence_length,
    schedule={"unlock_epoch": unlock_epoch, "phase1_learning_rate": args.learning_rate,
              "phase2_learning_rate": args.unlock_learning_rate, "text_unlocked_groups": text_groups,
              "logit_scale": 20.0},
    trainable_parameters_phase2=int(sum(np.prod(v.shape) for v in model.trainable_variables)),
    history=common.history_summary(history),
    seconds=timer.seconds,
)
