"""`keras-clip-it demo`: the embedded encoders on embedded data, fully offline.

Shows what the package does with nothing but what pip and apt installed: ImageNet classes for sample
photos from scikit-image, nearest emoji by image, and nearest captions for English and Italian queries.
"""

import time


def _photos():
    import skimage.data

    names = ["chelsea", "coffee", "astronaut", "rocket"]
    return names, [getattr(skimage.data, name)() for name in names]


def _step(title):
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run(args):
    import numpy as np

    import keras_clip_it as kci

    start = _step("Loading the embedded image encoder (EfficientNet-Lite0, ImageNet)")
    image_encoder = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
    print(f"   ready in {time.perf_counter() - start:.1f}s, {image_encoder.embedding_dim}-d features")

    _step("ImageNet top-5 for scikit-image's sample photos")
    names, photos = _photos()
    for name, top in zip(names, image_encoder.classify(photos, top_k=5)):
        print(f"   {name:10s} " + ", ".join(f"{label} {probability:.2f}" for label, probability in top))

    _step("Nearest emoji by image (held-out emoji against the training emoji)")
    train_ids, train_images, train_captions = kci.datasets.emoji_pairs("en", split="train", return_ids=True)
    test_ids, test_images, test_captions = kci.datasets.emoji_pairs("en", split="test", return_ids=True)
    gallery = image_encoder.embed(train_images, batch_size=64, progress=True)
    queries = image_encoder.embed(test_images[: args.examples])
    for caption, row in zip(test_captions, queries @ gallery.T):
        nearest = np.argsort(-row)[:3]
        print(f"   {caption:28s} -> " + "; ".join(train_captions[j] for j in nearest))

    start = _step("Loading the embedded English text encoder (all-MiniLM-L6-v2)")
    text_encoder = kci.TextEncoder.from_preset("all_minilm_l6_v2")
    print(f"   ready in {time.perf_counter() - start:.1f}s, {text_encoder.embedding_dim}-d features")

    _step("Nearest emoji names for free-text queries")
    captions = train_captions + test_captions
    caption_embeddings = text_encoder.embed(captions, batch_size=128, progress=True)
    queries = ["a happy animal", "something to eat for breakfast", "bad weather", "una bandiera italiana"]
    for query, row in zip(queries, text_encoder.embed(queries) @ caption_embeddings.T):
        nearest = np.argsort(-row)[:3]
        print(f"   {query:32s} -> " + "; ".join(captions[j] for j in nearest))
    return 0


def register(subparsers):
    parser = subparsers.add_parser("demo", help="run the offline demo on the embedded encoders and data")
    parser.add_argument("--examples", type=int, default=8, help="held-out emoji to show")
    parser.set_defaults(func=run)
