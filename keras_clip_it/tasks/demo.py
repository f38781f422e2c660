"""`keras-clip-it demo`: ASIF in Italian on the embedded emoji collection, fully offline.

Two frozen unimodal encoders (EfficientNet-Lite0 for images, multilingual-e5-small for Italian text)
become one image-text model through the "emoji-it" analogy collection. The demo removes the held-out
pairs from the collection (which changes the model in milliseconds), then shows zero-shot
classification and retrieval on the held-out emoji, the anchor pairs behind a prediction, and an
occlusion map, and writes everything into one HTML report.
"""

import os
import time

import numpy as np

# Emoji drawn together into one picture for the localization map, and the text to find in it.
SCENE = ["gatto", "pizza", "auto", "albero di natale"]
SCENE_QUERY = "gatto"
RETRIEVAL_QUERIES = ["un gatto", "una pizza", "la bandiera dell'Italia", "un cuore rosso", "la pioggia"]


def _step(title):
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(start, what=""):
    print(f"   {what}done in {time.perf_counter() - start:.1f}s", flush=True)


def _find(captions, word):
    """Index of the shortest caption containing `word` (the plainest emoji for it)."""
    matches = [i for i, caption in enumerate(captions) if word.lower() in caption.lower()]
    if not matches:
        raise LookupError(f"no emoji caption contains {word!r}")
    return min(matches, key=lambda i: len(captions[i]))


def _scene(images, captions):
    """A 2x2 picture of four emoji, for the localization map."""
    tiles = [images[_find(captions, word)] for word in SCENE]
    return np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)


def run(args):
    import keras_clip_it as kci
    from keras_clip_it.tasks.report import Report

    report = Report("keras-clip-it: ASIF in italiano sugli emoji")
    total = time.perf_counter()

    start = _step("Loading the frozen encoders (EfficientNet-Lite0 images, multilingual-e5-small Italian text)")
    image_encoder = kci.ImageEncoder.from_preset("efficientnet_lite0_imagenet")
    text_encoder = kci.TextEncoder.from_preset("multilingual_e5_small")
    _done(start)

    start = _step("Building ASIF on the 'emoji-it' collection (embedding every pair once)")
    collection = kci.collections.load("emoji-it")
    # k and p tuned for this small collection of distinct captions on a validation split of the training
    # pairs (recipes/asif_emoji.py); the model's defaults (800, 8) suit larger collections.
    asif = kci.ASIF(image_encoder, text_encoder, k=10, p=16)
    asif.use(collection)
    _done(start, f"{len(collection)} pairs, k={asif.k}, p={asif.p:g}: ")

    test_ids, test_images, test_captions = kci.datasets.emoji_pairs("it", split="test", return_ids=True)
    start = time.perf_counter()
    asif.remove(list(test_ids))
    removed_ms = 1000 * (time.perf_counter() - start)
    print(f"   removed the {len(test_ids)} held-out pairs in {removed_ms:.1f} ms: the model now has "
          f"{len(asif.collection)} anchors and has never seen the emoji below")
    report.text(
        "Il modello",
        f"ASIF (k={asif.k}, p={asif.p:g}) su {len(asif.collection)} coppie (emoji, nome italiano). "
        f"Le {len(test_ids)} coppie di test sono state tolte dalla collezione in {removed_ms:.1f} ms: "
        "togliere o aggiungere coppie cambia il modello senza addestramento.",
    )

    start = _step(f"Zero-shot: each held-out emoji against all {len(test_captions)} held-out Italian names")
    classifier = kci.ZeroShotClassifier(asif, test_captions, templates=None)
    scores = classifier.scores(test_images)
    truth = np.arange(len(test_captions))
    recalls = {k: kci.metrics.recall_at_k(scores, truth, k) for k in (1, 5, 10)}
    chance = 1 / len(test_captions)
    print("   " + ", ".join(f"R@{k} {value:.3f}" for k, value in recalls.items()) + f" (chance R@1 {chance:.4f})")
    report.table(
        "Classificazione zero-shot degli emoji mai visti",
        ["metrica", "valore"],
        [[f"R@{k}", value] for k, value in recalls.items()] + [["R@1 a caso", chance]],
    )
    shown = list(range(min(args.examples, len(test_captions))))
    predicted = scores[shown].argmax(axis=1)
    for i, j in zip(shown, predicted):
        mark = "ok " if i == j else "   "
        print(f"   {mark}{test_captions[i]:32s} -> {test_captions[j]}")
    report.figure(
        "Esempi (vero → previsto)",
        kci.plot.image_grid(
            test_images[shown], [f"{test_captions[i]}\n→ {test_captions[j]}" for i, j in zip(shown, predicted)]
        ),
    )
    _done(start)

    start = _step("Retrieval: Italian queries against the held-out emoji")
    result = kci.retrieve(asif, RETRIEVAL_QUERIES, test_images, top_k=5)
    grid_images, grid_captions = [], []
    for q, query in enumerate(RETRIEVAL_QUERIES):
        best = [test_captions[j] for j, _ in result[q]]
        print(f"   {query:26s} -> " + "; ".join(best[:3]))
        grid_images += [test_images[j] for j, _ in result[q]]
        grid_captions += [f"{query}\n{score:.2f}" for _, score in result[q]]
    report.figure("Ricerca testo → immagine", kci.plot.image_grid(grid_images, grid_captions, columns=5))
    _done(start)

    start = _step("Explanation: the anchor pairs behind one prediction")
    example = shown[0]
    label = test_captions[predicted[0]]
    anchors = asif.explain(test_images[example], label, top=5)
    for anchor in anchors:
        print(f"   {anchor['weight']:.4f}  {anchor['caption']}")
    report.table(
        f"Perché «{label}»? Le coppie della collezione dietro il punteggio",
        ["id", "didascalia", "peso"],
        [[anchor["id"], anchor["caption"], anchor["weight"]] for anchor in anchors],
    )
    if anchors and all(anchor["image_ref"] for anchor in anchors):
        report.figure(
            "Le immagini di quelle coppie",
            kci.plot.image_grid([a["image_ref"] for a in anchors], [f"{a['caption']}\n{a['weight']:.3f}" for a in anchors]),
        )
    _done(start)

    start = _step(f"Localization: where is «{SCENE_QUERY}» in a picture of four emoji?")
    train_images, train_captions = kci.datasets.emoji_pairs("it", split="all")
    scene = _scene(train_images, train_captions)
    heatmap = kci.localize(asif, scene, SCENE_QUERY)
    half_h, half_w = scene.shape[0] // 2, scene.shape[1] // 2
    quadrants = [heatmap[:half_h, :half_w], heatmap[:half_h, half_w:], heatmap[half_h:, :half_w], heatmap[half_h:, half_w:]]
    strongest = SCENE[int(np.argmax([q.mean() for q in quadrants]))]
    print(f"   the map is strongest on the {strongest!r} tile")
    report.figure(f"Dove si trova «{SCENE_QUERY}»?", kci.plot.heatmap(scene, heatmap, title=SCENE_QUERY),
                  caption="mappa di occlusione: quanto cala il punteggio coprendo ogni zona")
    _done(start)

    path = report.save(os.path.join(args.output, "report.html"))
    print(f"\nReport: {path}  (total {time.perf_counter() - total:.0f}s)")
    return 0


def register(subparsers):
    parser = subparsers.add_parser("demo", help="ASIF in Italian on the embedded emoji, offline, with an HTML report")
    parser.add_argument("--examples", type=int, default=10, help="held-out emoji shown with their predictions")
    parser.add_argument("--output", default="outputs/demo", help="folder for report.html")
    parser.set_defaults(func=run)
