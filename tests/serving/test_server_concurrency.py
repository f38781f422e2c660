"""8 clients classify while another adds, removes and swaps collections every 100 ms.

Every answer must be a 200 computed on exactly one collection state: the test keeps its own record of
what each version the server announced contained, and recomputes the expected scores of every answer
for the version it names with a dense numpy ASIF.
"""

import threading
import time

import httpx
import numpy as np
import pytest

import keras_clip_it as kci
from tests.serving.conftest import LABELS
from tests.serving.conftest import random_collection
from tests.serving.conftest import serve
from tests.serving.conftest import unit_rows

K, P = 8, 3.0
CLIENTS = 8
CHANGES = 24


def dense_relative(queries, anchors):
    similarities = queries @ anchors.T
    k = min(K, anchors.shape[0])
    top = np.argsort(-similarities, axis=1)[:, :k]
    weights = np.zeros_like(similarities)
    np.put_along_axis(weights, top, np.maximum(np.take_along_axis(similarities, top, axis=1), 0) ** P, axis=1)
    return weights / np.maximum(np.linalg.norm(weights, axis=1, keepdims=True), 1e-30)


def expected_scores(state, queries, label_embeddings):
    images = np.stack([image for image, _ in state.values()])
    texts = np.stack([text for _, text in state.values()])
    return dense_relative(queries, images) @ dense_relative(label_embeddings, texts).T


def as_state(collection, image_encoder, text_encoder):
    images = collection.embeddings("image", image_encoder.fingerprint)
    texts = collection.embeddings("text", text_encoder.fingerprint)
    return {i: (images[row].copy(), texts[row].copy()) for row, i in enumerate(collection.ids)}


@pytest.mark.slow
def test_classify_during_collection_changes_sees_one_version(encoders):
    image_encoder, text_encoder = encoders
    alpha = random_collection("alpha", 40, image_encoder, text_encoder, seed=11)
    beta = random_collection("beta", 32, image_encoder, text_encoder, seed=12)
    states = {
        "alpha": as_state(alpha, image_encoder, text_encoder),
        "beta": as_state(beta, image_encoder, text_encoder),
    }
    asif = kci.ASIF(image_encoder, text_encoder, k=K, p=P, collection=alpha, center=False)
    server = serve(kci.serving.create_app(asif, collections=[beta]))
    versions = {1: ("alpha", dict(states["alpha"]))}
    answers, failures = [], []
    done = threading.Event()

    def classify(seed):
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not done.is_set():
                queries = unit_rows(rng, 3, image_encoder.embedding_dim)
                response = http.post("/v1/classify", json={"image_embeddings": queries.tolist(), "labels": LABELS})
                if response.status_code != 200:
                    failures.append((response.status_code, response.text))
                else:
                    answers.append((queries, response.json()))

    def change():
        rng = np.random.default_rng(0)
        active = "alpha"
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for step in range(CHANGES):
                time.sleep(0.1)
                if step % 3 == 0:
                    ids = [f"new-{step}-{i}" for i in range(2)]
                    images = unit_rows(rng, 2, image_encoder.embedding_dim)
                    texts = unit_rows(rng, 2, text_encoder.embedding_dim)
                    request = (
                        "/v1/collections/pairs",
                        {
                            "ids": ids,
                            "captions": ["new", "pair"],
                            "image_embeddings": images.tolist(),
                            "text_embeddings": texts.tolist(),
                        },
                    )
                    states[active].update({i: (im, tx) for i, im, tx in zip(ids, images, texts)})
                elif step % 3 == 1:
                    ids = [str(i) for i in rng.choice(sorted(states[active]), 2, replace=False)]
                    request = ("/v1/collections/remove", {"ids": ids})
                    for i in ids:
                        del states[active][i]
                else:
                    active = "beta" if active == "alpha" else "alpha"
                    request = ("/v1/collections/activate", {"name": active})
                response = http.post(request[0], json=request[1])
                assert response.status_code == 200, response.text
                info = response.json()["collection"]
                assert info["name"] == active and info["pairs"] == len(states[active])
                versions[info["version"]] = (active, dict(states[active]))

    clients = [threading.Thread(target=classify, args=(seed,)) for seed in range(CLIENTS)]
    try:
        for thread in clients:
            thread.start()
        change()
    finally:
        done.set()
        for thread in clients:
            thread.join()
        server.stop()

    assert not failures, failures[:3]
    labels = text_encoder.embed(LABELS)
    seen = set()
    for queries, body in answers:
        info = body["collection"]
        name, state = versions[info["version"]]
        assert (info["name"], info["pairs"]) == (name, len(state))
        scores = np.array([prediction["scores"] for prediction in body["predictions"]])
        np.testing.assert_allclose(scores, expected_scores(state, queries, labels), atol=2e-5)
        seen.add(info["version"])
    assert len(answers) >= 4 * CLIENTS
    assert len(seen) >= CHANGES // 2, f"the clients saw only versions {sorted(seen)}"
