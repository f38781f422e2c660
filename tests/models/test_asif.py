"""ASIF: representations against a dense numpy computation, edits, classification, unknown, saving.

Tiny deterministic encoders stand in for the pretrained towers (the maths is what is tested here); the
other test_asif_*.py files import them from this module.
"""

import hashlib
import json
import os

import keras
import numpy as np
import pytest

import keras_clip_it as kci
from keras_clip_it.collections import AnalogyCollection
from keras_clip_it.models.asif import ASIF
from keras_clip_it.models.asif_state import RelativeRepresentation
from keras_clip_it.models.asif_state import sparse_inner
from keras_clip_it.templates import ENGLISH
from keras_clip_it.templates import get_templates
from tests.helpers import assert_keras_roundtrip

CLASSES = ["cat", "dog", "car", "tree", "boat"]
FILLERS = ["small", "big", "red", "old", "happy", "dark", "near", "far"]


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@keras.saving.register_keras_serializable(package="keras_clip_it_tests")
class VectorEncoder(keras.Model):
    """'Images' are already vectors: embed() only normalises them."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.built = True

    @property
    def embedding_dim(self):
        return self.dim

    @property
    def fingerprint(self):
        return f"vector-{self.dim}"

    def embed(self, inputs, batch_size=32):
        return unit(np.reshape(np.asarray(inputs, np.float32), (-1, self.dim)))

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


@keras.saving.register_keras_serializable(package="keras_clip_it_tests")
class WordEncoder(keras.Model):
    """A bag of words: each word a fixed random vector (seeded by its hash), summed and normalised."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.built = True

    @property
    def embedding_dim(self):
        return self.dim

    @property
    def fingerprint(self):
        return f"words-{self.dim}"

    def _word(self, word):
        seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        return np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)

    def embed(self, texts, batch_size=64):
        words = [[w.strip(".,'") for w in t.lower().split()] for t in texts]
        return unit([np.sum([self._word(w) for w in ws if w] or [np.ones(self.dim)], axis=0) for ws in words])

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


def synthetic_pairs(n, dim=48, noise=0.6, seed=0, start=0):
    """n (image vector, caption) pairs over CLASSES; image vectors cluster around a centre per class.

    Image vectors use only the first dim - 8 coordinates, so a query on the last 8 shares no anchor.
    """
    rng = np.random.default_rng(seed)
    centres = unit(np.pad(np.random.default_rng(123).standard_normal((len(CLASSES), dim - 8)), ((0, 0), (0, 8))))
    classes = rng.integers(0, len(CLASSES), n)
    images = unit(centres[classes] + noise * np.pad(rng.standard_normal((n, dim - 8)), ((0, 0), (0, 8))) / np.sqrt(dim))
    captions = [f"a {rng.choice(FILLERS)} {CLASSES[c]} {rng.choice(FILLERS)}" for c in classes]
    ids = [f"pair{i}" for i in range(start, start + n)]
    return ids, images, captions, classes, centres


def dense_relative(queries, anchors, k, p):
    """The definition, densely: top-k cosine similarities, clipped at 0, ** p, L2-normalised."""
    sims = unit(queries) @ unit(anchors).T
    out = np.zeros_like(sims)
    top = np.argsort(-sims, axis=1)[:, :k]
    rows = np.arange(len(sims))[:, None]
    out[rows, top] = np.maximum(sims[rows, top], 0) ** p
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norms > 0, out / np.maximum(norms, 1e-30), 0)


def make_asif(n=400, k=40, p=4.0, dim=48, **kwargs):
    ids, images, captions, classes, centres = synthetic_pairs(n, dim=dim)
    asif = ASIF(VectorEncoder(dim), WordEncoder(32), k=k, p=p, **kwargs)
    asif.add(ids, images=images, captions=captions)
    return asif, (ids, images, captions, classes, centres)


def test_representation_equals_dense_numpy():
    rng = np.random.default_rng(1)
    anchors_img, anchors_txt = unit(rng.standard_normal((700, 24))), unit(rng.standard_normal((700, 16)))
    asif = ASIF(VectorEncoder(24), WordEncoder(16), k=37, p=3.0, center=False)  # the paper's definition
    asif.add([str(i) for i in range(700)], image_embeddings=anchors_img, text_embeddings=anchors_txt)
    queries = rng.standard_normal((9, 24))
    rep = asif.encode_images(queries)
    assert rep.indices.shape == (9, 37) and rep.values.dtype == np.float32
    np.testing.assert_allclose(rep.to_dense(), dense_relative(queries, anchors_img, 37, 3.0), atol=2e-6)
    texts = ["a cat", "the red boat", "near"]
    text_rep = asif.encode_texts(texts)
    want_text = dense_relative(WordEncoder(16).embed(texts), anchors_txt, 37, 3.0)
    np.testing.assert_allclose(text_rep.to_dense(), want_text, atol=2e-6)
    np.testing.assert_allclose(
        asif.similarity(rep, text_rep), dense_relative(queries, anchors_img, 37, 3.0) @ want_text.T, atol=1e-5
    )


def test_sparse_inner_equals_dense_product():
    rng = np.random.default_rng(2)

    def random_rep(rows, k, n):
        indices = np.stack([rng.choice(n, k, replace=False) for _ in range(rows)])
        return RelativeRepresentation(indices, rng.random((rows, k)).astype("float32"), n, 0)

    left, right = random_rep(13, 30, 80), random_rep(7, 25, 80)
    np.testing.assert_allclose(sparse_inner(left, right), left.to_dense() @ right.to_dense().T, rtol=1e-5)


def test_add_then_remove_equals_rebuilding_from_scratch():
    # Uncentred: a centred model keeps its centre through small changes (test_asif_centering.py).
    asif, (ids, images, captions, _, centres) = make_asif(300, center=False)
    extra_ids, extra_images, extra_captions, _, _ = synthetic_pairs(120, seed=5, start=1000)
    queries = unit(centres[[0, 2, 4]] + 0.1)
    texts = ["a cat", "a big tree"]

    def scores(model):
        return model.similarity(model.encode_images(queries), model.encode_texts(texts))

    before = scores(asif)
    asif.add(extra_ids, images=extra_images, captions=extra_captions)
    changed = scores(asif)
    asif.remove(extra_ids)
    np.testing.assert_allclose(scores(asif), before, atol=1e-6)
    # The reverse: remove some pairs, add them back.
    asif.remove(ids[:50])
    asif.add(ids[:50], images=images[:50], captions=captions[:50])
    np.testing.assert_allclose(scores(asif), before, atol=1e-6)
    # And the edited model equals one built from scratch on the same final pairs.
    fresh, _ = make_asif(300, center=False)
    fresh.add(extra_ids, images=extra_images, captions=extra_captions)
    asif.add(extra_ids, images=extra_images, captions=extra_captions)
    np.testing.assert_allclose(scores(asif), scores(fresh), atol=1e-6)
    np.testing.assert_allclose(scores(asif), changed, atol=1e-6)
    assert not np.allclose(changed, before)


def test_stale_representations_are_refused():
    asif, (ids, *_rest) = make_asif(100)
    rep = asif.encode_images(_rest[0][:2])
    text = asif.encode_texts(["a cat"])
    asif.remove(ids[:1])
    with pytest.raises(ValueError, match="encode it again"):
        asif.similarity(rep, text)


def test_classify_with_templates_and_unknown():
    # Uncentred: a query orthogonal to every anchor then shares none with any label (centring moves it).
    asif, (_, _, _, _, centres) = make_asif(500, center=False)
    rng = np.random.default_rng(3)
    truth = np.arange(len(CLASSES)).repeat(4)
    queries = unit(centres[truth] + 0.3 * rng.standard_normal((len(truth), 48)) / np.sqrt(48) * np.r_[np.ones(40), np.zeros(8)])
    result = asif.classify(queries, labels=CLASSES, templates=["a {}", lambda label: f"the {label}"])
    assert result.scores.shape == (len(truth), len(CLASSES))
    assert np.mean(result.indices == truth) >= 0.9
    assert [CLASSES[i] for i in result.indices] == result.labels
    # A query orthogonal to every anchor image shares no anchor with any label: "unknown".
    orthogonal = np.zeros((1, 48), np.float32)
    orthogonal[0, -1] = 1.0
    unknown = asif.classify(orthogonal, labels=CLASSES, templates="en-short")
    assert unknown.labels == ["unknown"] and unknown.indices.tolist() == [-1]
    assert float(unknown.scores.max()) == 0.0


def test_class_representations_are_cached_per_collection_version():
    asif, _ = make_asif(200)
    first = asif.class_representations(CLASSES, "en-short")
    assert asif.class_representations(CLASSES, "en-short") is first
    extra_ids, extra_images, extra_captions, _, _ = synthetic_pairs(10, seed=9, start=5000)
    asif.add(extra_ids, images=extra_images, captions=extra_captions)
    second = asif.class_representations(CLASSES, "en-short")
    assert second is not first and second.version == asif.collection.version


def test_a_new_k_or_p_is_validated_and_represents_the_labels_again():
    asif, (_, images, _, _, _) = make_asif(200, k=50)
    before = asif.classify(images[:3], labels=CLASSES, templates="en-short")
    asif.k = 5
    assert asif.class_representations(CLASSES, "en-short").indices.shape == (len(CLASSES), 5)
    fresh = ASIF(asif.image_encoder, asif.text_encoder, k=5, p=asif.p, collection=asif.collection)
    after = asif.classify(images[:3], labels=CLASSES, templates="en-short")
    np.testing.assert_allclose(after.scores, fresh.classify(images[:3], labels=CLASSES, templates="en-short").scores)
    assert not np.allclose(after.scores, before.scores)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        asif.k = 0
    with pytest.raises(ValueError, match="p must be positive"):
        asif.p = -1.0
    assert (asif.k, asif.p) == (5, 4.0)


def test_a_state_taken_before_a_change_keeps_answering_for_its_version():
    asif, (_, images, _, _, _) = make_asif(300)
    state = asif.snapshot()
    first = state.classify(state.relative(asif.image_encoder.embed(images[:4]), "image"), CLASSES, "en-short")
    extra_ids, extra_images, extra_captions, _, _ = synthetic_pairs(30, seed=11, start=9000)
    asif.add(extra_ids, images=extra_images, captions=extra_captions)
    assert asif.snapshot().version == state.version + 1 and state.pairs == 300
    again = state.classify(state.relative(asif.image_encoder.embed(images[:4]), "image"), CLASSES, "en-short")
    np.testing.assert_array_equal(again.scores, first.scores)


def test_calibrate_meets_the_target_error():
    asif, (_, _, _, _, centres) = make_asif(400, k=20)
    rng = np.random.default_rng(4)
    truth = rng.integers(0, len(CLASSES), 200)
    # Hard queries (heavy noise) so that some answers are wrong and some scores are low.
    queries = unit(centres[truth] + 2.5 * rng.standard_normal((200, 48)) / np.sqrt(48))
    report = asif.calibrate([CLASSES[t] for t in truth], CLASSES, embeddings=queries, target_error=0.05)
    assert set(report) == {"threshold", "accuracy", "unknown", "wrong"}
    assert report["wrong"] <= 0.05 and report["unknown"] > 0
    assert report["accuracy"] + report["unknown"] + report["wrong"] == pytest.approx(1.0)
    assert asif.unknown_threshold == report["threshold"]
    result = asif.classify(embeddings=queries, labels=CLASSES)
    answered = result.indices >= 0
    assert np.mean(~answered) == pytest.approx(report["unknown"])
    assert np.mean(answered & (result.indices != truth)) == pytest.approx(report["wrong"])
    # A looser budget answers more.
    loose = asif.calibrate(truth, CLASSES, embeddings=queries, target_error=0.3)
    assert loose["unknown"] <= report["unknown"] and loose["threshold"] <= report["threshold"]


def test_encoded_queries_pass_through_classify_and_calibrate():
    asif, (_, _, _, _, centres) = make_asif(300)
    truth = np.array([0, 1, 2, 3])
    queries = unit(centres[truth] + 0.1)
    reps = asif.encode_images(embeddings=queries)
    assert asif.encode_images(reps) is reps
    want = asif.classify(embeddings=queries, labels=CLASSES).scores
    np.testing.assert_array_equal(asif.classify(reps, labels=CLASSES).scores, want)
    assert asif.calibrate(truth[:2], CLASSES, images=reps[:2]) == asif.calibrate(truth[:2], CLASSES, embeddings=queries[:2])


def test_explain_returns_the_anchors_behind_the_score():
    asif, (ids, images, captions, classes, centres) = make_asif(300)
    query = unit(centres[1] + 0.05)
    pairs = asif.explain(embedding=query, label="dog", top=None)
    score = asif.classify(embeddings=query[None], labels=["dog"]).scores[0, 0]
    assert sum(p["weight"] for p in pairs) == pytest.approx(float(score), rel=1e-4)
    weights = [p["weight"] for p in pairs]
    assert weights == sorted(weights, reverse=True)
    # The heaviest anchors are dog pairs, with their captions.
    for pair in pairs[:5]:
        row = ids.index(pair["id"])
        assert classes[row] == 1 and pair["caption"] == captions[row] and "dog" in pair["caption"]
    # Each weight is the product of the two sides' weights at that anchor.
    image_rep = asif.encode_images(embeddings=query[None])
    row = asif.collection.rows([pairs[0]["id"]])[0]
    position = list(image_rep.indices[0]).index(row)
    assert pairs[0]["image_weight"] == pytest.approx(float(image_rep.values[0, position]))
    assert len(asif.explain(embedding=query, label="dog", top=3)) == 3


def test_fine_prune_keeps_the_anchors_that_matter():
    asif, (_, _, _, _, centres) = make_asif(500)
    rng = np.random.default_rng(6)
    truth = np.arange(len(CLASSES)).repeat(6)
    queries = unit(centres[truth] + 0.5 * rng.standard_normal((len(truth), 48)) / np.sqrt(48))
    pruned = asif.fine_prune(CLASSES, m=120)
    assert len(pruned) == 120 and len(asif.collection) == 500
    small = ASIF(asif.image_encoder, asif.text_encoder, k=asif.k, p=asif.p, collection=pruned)
    assert np.mean(small.classify(embeddings=queries, labels=CLASSES).indices == truth) >= 0.9


@pytest.mark.parametrize("anchor_dtype", ["float16", "int8"])
def test_compressed_anchors_agree_with_float32(anchor_dtype):
    asif, (_, images, _, _, centres) = make_asif(400)
    small, _ = make_asif(400, anchor_dtype=anchor_dtype)
    queries = images[:60]
    full = asif.classify(embeddings=queries, labels=CLASSES, templates="en-short")
    compressed = small.classify(embeddings=queries, labels=CLASSES, templates="en-short")
    assert np.mean(full.indices == compressed.indices) >= 0.98
    # Rounding can swap the anchor at the k-th place, moving a score by that anchor's weight.
    np.testing.assert_allclose(compressed.scores, full.scores, atol=0.05)
    assert np.median(np.abs(compressed.scores - full.scores)) < (1e-3 if anchor_dtype == "int8" else 1e-4)


def test_keras_roundtrip_keeps_the_collection(tmp_path):
    asif, (_, images, _, _, _) = make_asif(150, anchor_dtype="int8", unknown_threshold=0.05)
    asif.collection.name = "synthetic-it"

    def run(model):
        result = model.classify(embeddings=images[:8], labels=CLASSES, templates="it-short")
        return [result.scores, result.indices]

    reloaded = assert_keras_roundtrip(asif, run, tmp_path, imports=[__name__])  # this module's test towers
    assert reloaded.collection.ids == asif.collection.ids
    assert reloaded.collection.captions == asif.collection.captions
    assert reloaded.collection.name == "synthetic-it"
    assert (reloaded.k, reloaded.p, reloaded.anchor_dtype, reloaded.unknown_threshold) == (40, 4.0, "int8", 0.05)


def test_use_swaps_collections_and_reports_missing_embeddings():
    asif, _ = make_asif(100)
    ids, images, captions, _, _ = synthetic_pairs(50, seed=8)
    other = AnalogyCollection(name="other", language="en")
    other.add(ids, captions=captions, image_refs=[None] * 50, embeddings={"image": {"vector-48": images}})
    # Captions are embedded with the model's text encoder; the images were given.
    asif.use(other)
    assert asif.collection is other and other.has_embeddings("text", "words-32")
    assert asif.encode_images(images[:2]).num_anchors == 50
    missing = AnalogyCollection(name="raw")
    missing.add(["a"], captions=["a cat"])
    with pytest.raises(ValueError, match="image_refs"):
        asif.use(missing)


def test_bad_arguments_are_clear():
    with pytest.raises(TypeError, match="embed"):
        ASIF(object(), WordEncoder(8))
    with pytest.raises(ValueError, match="anchor_dtype"):
        ASIF(VectorEncoder(8), WordEncoder(8), anchor_dtype="int4")
    empty = ASIF(VectorEncoder(8), WordEncoder(8))
    with pytest.raises(ValueError, match="no anchors yet"):
        empty.encode_images(np.ones((1, 8)))
    asif, _ = make_asif(50)
    with pytest.raises(TypeError, match="single string"):
        asif.classify(np.ones((1, 48)), labels="cat")


def test_templates():
    assert len(ENGLISH) == 80 and len(set(ENGLISH)) == 80
    assert get_templates("it")[0] == "una foto di {}."
    assert all("{}" in t for name in ("en", "en-short", "it", "it-short") for t in get_templates(name))
    assert get_templates(None) == ("{}",)
    with pytest.raises(ValueError, match="no '{}'"):
        get_templates(["a photo of a cat"])


def test_exported_from_package():
    assert kci.ASIF is ASIF
    assert kci.collections.AnalogyCollection is AnalogyCollection
