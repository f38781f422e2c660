"""Adding and removing pairs on the server costs O(pairs changed) and never disturbs a published snapshot.

The server edits its own copy of the active collection in place and brings the anchor indexes along
with `follow`; no index is built from scratch and no collection is copied. A snapshot taken before a
change keeps answering for its own version.
"""

import numpy as np

import keras_clip_it as kci
from keras_clip_it.collections.analogy_collection import AnalogyCollection
from keras_clip_it.models import asif_state
from tests.serving.conftest import random_collection
from tests.serving.conftest import unit_rows


def dense_relative(queries, anchors, k, p):
    """The uncentred definition: these models are built with center=False, which this file is not about."""
    similarities = queries @ anchors.T
    top = np.argsort(-similarities, axis=1)[:, :k]
    weights = np.zeros_like(similarities)
    np.put_along_axis(weights, top, np.maximum(np.take_along_axis(similarities, top, axis=1), 0) ** p, axis=1)
    return weights / np.maximum(np.linalg.norm(weights, axis=1, keepdims=True), 1e-30)


def check_snapshot(snapshot, queries, anchors, kind):
    """The snapshot's representations equal a dense ASIF over `anchors` (rows in the collection's order)."""
    got = snapshot.relative(queries, kind).to_dense()
    np.testing.assert_allclose(got, dense_relative(queries, anchors, snapshot.k, snapshot.p), atol=1e-5)


def test_add_and_remove_follow_the_indexes_without_rebuilding_or_copying(encoders, monkeypatch):
    image_encoder, text_encoder = encoders
    given = random_collection("alpha", 300, image_encoder, text_encoder, seed=3)
    given_version = given.version
    asif = kci.ASIF(image_encoder, text_encoder, k=16, p=3.0, collection=given, center=False)
    service = kci.serving.create_app(asif).state.service
    image_fp, text_fp = image_encoder.fingerprint, text_encoder.fingerprint
    collection = service.collection
    assert collection is not given  # the server edits its own copy

    built = []
    original = asif_state.AnchorIndex

    def counting(*args, **kwargs):
        built.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(asif_state, "AnchorIndex", counting)
    copies = []
    monkeypatch.setattr(AnalogyCollection, "add", _spy(AnalogyCollection.add, copies))

    rng = np.random.default_rng(0)
    queries = unit_rows(rng, 5, image_encoder.embedding_dim)
    texts = unit_rows(rng, 5, text_encoder.embedding_dim)
    before = service.snapshot
    old_images = collection.embeddings("image", image_fp).copy()
    old_texts = collection.embeddings("text", text_fp).copy()

    ids = [f"new-{i}" for i in range(4)]
    new_images = unit_rows(rng, 4, image_encoder.embedding_dim)
    new_texts = unit_rows(rng, 4, text_encoder.embedding_dim)
    added = service.add(ids, ["new"] * 4, image_embeddings=new_images.tolist(), text_embeddings=new_texts.tolist())
    assert added["collection"] == {"name": "alpha", "version": before.version + 1, "pairs": 304}
    removed_ids = [collection.ids[i] for i in (0, 7, 150, 301)]
    removed = service.remove(removed_ids)
    assert removed["collection"] == {"name": "alpha", "version": before.version + 2, "pairs": 300}

    assert built == []  # both changes followed the existing indexes
    assert [len(args[1]) for args in copies] == [4]  # one collection edit of 4 rows: nothing was copied
    assert service.collection is collection and len(collection) == 300
    after = service.snapshot
    check_snapshot(after, queries, collection.embeddings("image", image_fp), "image")
    check_snapshot(after, texts, collection.embeddings("text", text_fp), "text")
    # The snapshot taken before both changes still answers for its version, and the given collection is as it was.
    check_snapshot(before, queries, old_images, "image")
    check_snapshot(before, texts, old_texts, "text")
    assert len(given) == 300 and given.version == given_version and asif.collection is given


def test_activating_builds_indexes_and_removing_everything_leaves_no_anchors(encoders):
    image_encoder, text_encoder = encoders
    alpha = random_collection("alpha", 20, image_encoder, text_encoder, seed=4)
    beta = random_collection("beta", 12, image_encoder, text_encoder, seed=5)
    asif = kci.ASIF(image_encoder, text_encoder, k=4, p=2.0, collection=alpha, center=False)
    service = kci.serving.create_app(asif, collections=[beta]).state.service
    service.activate("beta")
    assert service.snapshot.info() == {"name": "beta", "version": 2, "pairs": 12}
    service.remove(service.collection.ids)
    assert service.snapshot.indexes is None and service.snapshot.pairs == 0
    rng = np.random.default_rng(1)
    service.add(
        ["x", "y"],
        ["x", "y"],
        image_embeddings=unit_rows(rng, 2, image_encoder.embedding_dim).tolist(),
        text_embeddings=unit_rows(rng, 2, text_encoder.embedding_dim).tolist(),
    )
    queries = unit_rows(rng, 3, image_encoder.embedding_dim)
    anchors = service.collection.embeddings("image", image_encoder.fingerprint)
    check_snapshot(service.snapshot, queries, anchors, "image")
    service.activate("alpha")  # edits of beta are kept while alpha is active
    service.activate("beta")
    assert service.snapshot.info() == {"name": "beta", "version": 6, "pairs": 2} and len(beta) == 12


def _spy(method, calls):
    def spy(self, ids, *args, **kwargs):
        calls.append((self, list(ids)))
        return method(self, ids, *args, **kwargs)

    return spy


def test_the_server_answers_with_the_models_centring_and_pooling(encoders):
    image_encoder, text_encoder = encoders
    collection = random_collection("alpha", 200, image_encoder, text_encoder, seed=5)
    queries = unit_rows(np.random.default_rng(2), 4, image_encoder.embedding_dim)
    labels, templates = ["cat", "dog", "car"], ["a {}", "the {}", "a photo of a {}"]
    answers = {}
    for center, pooling in ((True, "max"), (True, "average"), (False, "mean")):
        asif = kci.ASIF(image_encoder, text_encoder, k=12, p=3.0, collection=collection, center=center,
                        label_pooling=pooling)
        service = kci.serving.create_app(asif).state.service
        body = service.classify(labels, templates, image_embeddings=queries.tolist())
        scores = np.array([p["scores"] for p in body["predictions"]])
        expected = asif.classify(embeddings=queries, labels=labels, templates=templates).scores
        np.testing.assert_allclose(scores, expected, atol=1e-5)
        answers[center, pooling] = scores
        service.stop()
    assert not np.allclose(answers[True, "max"], answers[True, "average"], atol=1e-4)
    assert not np.allclose(answers[True, "average"], answers[False, "mean"], atol=1e-4)
