"""ASIF's centring and label pooling: the definitions against dense numpy, following changes, saving.

Centring subtracts each side's centre (its anchors' mean when first indexed) from anchors, queries and
labels and normalises again; the index searches the centred anchors. Label pooling scores a label from
its captions: averaged embeddings ("average"), or each caption represented and its scores pooled ("max",
"mean").
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_clip_it.collections import AnalogyCollection
from keras_clip_it.models.asif import ASIF
from keras_clip_it.templates import fill
from tests.models.test_asif import CLASSES
from tests.models.test_asif import VectorEncoder
from tests.models.test_asif import WordEncoder
from tests.models.test_asif import dense_relative
from tests.models.test_asif import synthetic_pairs
from tests.models.test_asif import unit

TEMPLATES = ["a {}", "a photo of the {}", lambda label: f"the small {label}"]


def make(n=300, shift=0.0, **kwargs):
    ids, images, captions, classes, centres = synthetic_pairs(n)
    asif = ASIF(VectorEncoder(48), WordEncoder(32), k=kwargs.pop("k", 40), p=kwargs.pop("p", 4.0), **kwargs)
    asif.add(ids, images=unit(images + shift), captions=captions)
    return asif, images


def centred(rows, center):
    return unit(np.asarray(rows, np.float32) - center)


def dense_model(asif, queries):
    """Image and label representations computed densely from the definition, with the state's centres."""
    state = asif.snapshot()
    collection, fingerprints = state.collection, state.anchors.fingerprints
    center = {kind: state.anchors.center(kind) for kind in ("image", "text")}
    image_anchors = centred(collection.embeddings("image", fingerprints["image"]), center["image"])
    text_anchors = centred(collection.embeddings("text", fingerprints["text"]), center["text"])
    images = dense_relative(centred(unit(queries), center["image"]), image_anchors, asif.k, asif.p)
    return images, text_anchors, center["text"]


def dense_scores(asif, queries, labels, templates, pooling):
    images, text_anchors, text_center = dense_model(asif, queries)
    captions = np.stack([asif.text_encoder.embed(fill(templates, label)) for label in labels])  # (C, T, D)
    if pooling == "average":
        mean = unit(captions.mean(axis=1))
        return images @ dense_relative(centred(mean, text_center), text_anchors, asif.k, asif.p).T
    flat = captions.reshape(-1, captions.shape[-1])
    per_caption = images @ dense_relative(centred(flat, text_center), text_anchors, asif.k, asif.p).T
    per_caption = per_caption.reshape(len(queries), len(labels), -1)
    return per_caption.max(axis=2) if pooling == "max" else per_caption.mean(axis=2)


def test_the_centre_is_the_anchors_mean_and_the_index_searches_centred_anchors():
    asif, images = make(shift=0.5)
    state = asif.snapshot()
    center = state.anchors.center("image")
    np.testing.assert_allclose(center, state.collection.embeddings("image", "vector-48").mean(axis=0), atol=1e-6)
    dense, _, _ = dense_model(asif, images[:20])
    np.testing.assert_allclose(asif.encode_images(embeddings=images[:20]).to_dense(), dense, atol=2e-6)
    assert ASIF(VectorEncoder(48), WordEncoder(32)).center is True  # the default


@pytest.mark.parametrize("pooling", ["average", "max", "mean"])
@pytest.mark.parametrize("center", [False, True])
def test_label_scores_equal_dense_numpy_and_explain_sums_to_them(pooling, center):
    # k = every anchor: repeated synthetic captions tie at any smaller k, and ties may break either way.
    asif, images = make(k=300, label_pooling=pooling, center=center)
    queries = images[:12]
    scores = asif.classify(embeddings=queries, labels=CLASSES, templates=TEMPLATES).scores
    if center:
        np.testing.assert_allclose(scores, dense_scores(asif, queries, CLASSES, TEMPLATES, pooling), atol=2e-5)
    rows = asif.class_representations(CLASSES, TEMPLATES)
    assert len(rows) == len(CLASSES) * (1 if pooling == "average" else len(TEMPLATES))
    for label in (0, 3):
        weights = asif.explain(embedding=queries[1], label=CLASSES[label], templates=TEMPLATES, top=None)
        np.testing.assert_allclose(sum(w["weight"] for w in weights), scores[1, label], atol=2e-5)


def test_pooling_is_part_of_the_published_state():
    asif, images = make(label_pooling="average")
    before = asif.snapshot()
    average = asif.classify(embeddings=images[:10], labels=CLASSES, templates=TEMPLATES).scores
    asif.label_pooling = "max"
    assert asif.snapshot() is not before and before.label_pooling == "average"
    best = asif.classify(embeddings=images[:10], labels=CLASSES, templates=TEMPLATES).scores
    assert not np.allclose(average, best)
    # The old state still answers as it did.
    old = before.class_scores(before.relative(images[:10], "image"), CLASSES, TEMPLATES)
    np.testing.assert_allclose(old, average, atol=1e-6)
    with pytest.raises(ValueError, match="label_pooling"):
        asif.label_pooling = "median"
    with pytest.raises(ValueError, match="label_pooling"):
        ASIF(VectorEncoder(48), WordEncoder(32), label_pooling="best")


def test_small_changes_keep_the_centre_and_stay_exact_for_it():
    asif, images = make(400)
    center = asif.snapshot().anchors.center("image")
    ids, extra, captions, _, _ = synthetic_pairs(8, seed=4, start=9000)
    asif.add(ids, images=extra, captions=captions)
    asif.remove(["pair3", "pair7"])
    state = asif.snapshot()
    np.testing.assert_array_equal(state.anchors.center("image"), center)  # followed, not rebuilt
    dense, _, _ = dense_model(asif, images[:15])
    np.testing.assert_allclose(asif.encode_images(embeddings=images[:15]).to_dense(), dense, atol=2e-6)
    # The collection's running mean followed the changes exactly.
    rows = state.collection.embeddings("image", "vector-48")
    np.testing.assert_allclose(state.collection.embedding_mean("image", "vector-48"), rows.mean(axis=0), atol=1e-6)


def test_a_moved_mean_centres_again():
    asif, images = make(200)
    ids, extra, captions, _, _ = synthetic_pairs(200, seed=6, start=7000)
    asif.add(ids, images=unit(extra + 1.0), captions=captions)  # half the collection, far away
    state = asif.snapshot()
    rows = state.collection.embeddings("image", "vector-48")
    np.testing.assert_allclose(state.anchors.center("image"), rows.mean(axis=0), atol=1e-6)
    dense, _, _ = dense_model(asif, images[:15])
    np.testing.assert_allclose(asif.encode_images(embeddings=images[:15]).to_dense(), dense, atol=2e-6)


def test_switching_centring_off_and_on_publishes_new_indexes():
    asif, images = make()
    on = asif.encode_images(embeddings=images[:5]).to_dense()
    asif.center = False
    off = asif.encode_images(embeddings=images[:5]).to_dense()
    np.testing.assert_allclose(off, dense_relative(images[:5], asif.snapshot().collection.embeddings("image", "vector-48"), 40, 4.0), atol=2e-6)
    asif.center = True
    np.testing.assert_allclose(asif.encode_images(embeddings=images[:5]).to_dense(), on, atol=1e-6)


def test_saved_centres_and_pooling_reload_in_a_new_process(tmp_path):
    asif, images = make(400, label_pooling="mean")
    asif.classify(embeddings=images[:1], labels=CLASSES, templates="en-short")  # both sides indexed and centred
    ids, extra, captions, _, _ = synthetic_pairs(6, seed=4, start=9000)
    asif.add(ids, images=extra, captions=captions)  # the centre is now not the collection's mean
    state = asif.snapshot()
    assert not np.allclose(state.anchors.center("image"), state.collection.embedding_mean("image", "vector-48"))
    expected = asif.classify(embeddings=images[:6], labels=CLASSES, templates="en-short").scores
    path = str(tmp_path / "asif.keras")
    asif.save(path)
    np.save(tmp_path / "queries.npy", images[:6])
    script = f"""
import json, keras, numpy as np
import tests.models.test_asif  # registers the test encoders
model = keras.saving.load_model({path!r}, safe_mode=True)
scores = model.classify(embeddings=np.load({str(tmp_path / 'queries.npy')!r}), labels={CLASSES!r}, templates="en-short").scores
print(json.dumps({{"pooling": model.label_pooling, "center": model.center, "scores": scores.tolist()}}))
"""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True, timeout=300)
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert (answer["pooling"], answer["center"]) == ("mean", True)
    np.testing.assert_allclose(np.array(answer["scores"]), expected, atol=1e-6)


def test_a_kept_collection_is_not_reused_across_a_centring_change():
    asif, images = make()
    first = asif.collection
    other = AnalogyCollection(name="other")
    ids, extra, captions, _, _ = synthetic_pairs(50, seed=2, start=5000)
    other.add(ids, captions=captions, embeddings={"image": {"vector-48": extra}})
    asif.use(other)
    asif.center = False
    asif.use(first)
    assert asif.snapshot().anchors.centered is False
    assert keras.saving.get_registered_object("keras_clip_it>ASIF") is ASIF


def test_tune_picks_settings_from_held_out_pairs_deterministically(tmp_path):
    rng = np.random.default_rng(0)
    images = unit(rng.standard_normal((300, 24)))
    texts = unit(images[:, :16] + 0.3 * rng.standard_normal((300, 16)))  # paired: the caption follows the image
    asif = ASIF(VectorEncoder(24), VectorEncoder(16), k=800, p=8.0)
    asif.add([f"p{i}" for i in range(300)], image_embeddings=images, text_embeddings=texts, captions=["c"] * 300)
    report = asif.tune(ks=(5, 40), ps=(2.0, 8.0))
    assert dict(asif.tuning) == report and report["pairs"] == 300 and report["queries"] == 60
    assert len(report["tried"]) == 2 * 2 * 2
    chosen = report["chosen"]
    assert chosen["score"] == max(row["score"] for row in report["tried"]) and chosen["score"] > 0.1  # chance: 1/60
    assert (asif.k, asif.p, asif.center) == (chosen["k"], chosen["p"], chosen["center"])
    assert len(asif.collection) == 300  # the model's own collection is untouched
    path = str(tmp_path / "tuned.keras")
    asif.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert (reloaded.k, reloaded.p, reloaded.center) == (asif.k, asif.p, asif.center)
    again = ASIF(VectorEncoder(24), VectorEncoder(16))
    again.add([f"p{i}" for i in range(300)], image_embeddings=images, text_embeddings=texts, captions=["c"] * 300)
    assert again.tune(ks=(5, 40), ps=(2.0, 8.0))["tried"] == report["tried"]
    with pytest.raises(ValueError, match="at least 10 pairs"):
        small = ASIF(VectorEncoder(24), VectorEncoder(16))
        small.add(["a", "b"], image_embeddings=images[:2], text_embeddings=texts[:2])
        small.tune()
