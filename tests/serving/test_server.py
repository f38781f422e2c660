"""The HTTP server answers like the model it serves: embed, classify, retrieve, collections, DualEncoder."""

import httpx
import numpy as np
import pytest

import keras_clip_it as kci
from keras_clip_it import cli
from tests.serving.conftest import LABELS
from tests.serving.conftest import b64
from tests.serving.conftest import encode_image
from tests.serving.conftest import serve
from tests.serving.conftest import unit_rows


def pictures(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (30 + 7 * i, 41, 3), dtype=np.uint8) for i in range(count)]


def test_health_names_model_and_collection(client):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["model"] == "ASIF"
    assert body["collection"]["pairs"] > 0 and body["collection"]["version"] >= 1


def test_embed_matches_the_encoders(client, encoders):
    image_encoder, text_encoder = encoders
    images = pictures(3)
    files = [encode_image(images[0], "PNG"), encode_image(images[1], "BMP"), encode_image(images[2], "PNG")]
    got = client.post("/v1/embed", json={"images": [b64(f) for f in files]}).json()
    assert got["kind"] == "image" and got["dim"] == image_encoder.embedding_dim
    np.testing.assert_allclose(got["embeddings"], image_encoder.embed(images), atol=1e-5)
    data_url = "data:image/png;base64," + b64(files[0])
    again = client.post("/v1/embed", json={"images": [data_url]}).json()
    np.testing.assert_allclose(again["embeddings"][0], got["embeddings"][0], atol=1e-6)
    texts = client.post("/v1/embed", json={"texts": ["a photo of a cat", "dog"]}).json()
    np.testing.assert_allclose(texts["embeddings"], text_encoder.embed(["a photo of a cat", "dog"]), atol=1e-5)


def test_classify_with_images_equals_asif_classify(asif_server, client, encoders):
    image_encoder, text_encoder = encoders
    service = asif_server.server.config.app.state.service
    images = pictures(4, seed=3)
    request = {"images": [b64(encode_image(im)) for im in images], "labels": LABELS, "templates": "a photo of a {}"}
    body = client.post("/v1/classify", json=request).json()
    snapshot = service.snapshot
    assert body["collection"] == snapshot.info()
    reference = kci.ASIF(image_encoder, text_encoder, k=8, p=3.0, collection=service.collection)
    expected = reference.classify(images, labels=LABELS, templates="a photo of a {}")
    np.testing.assert_allclose([p["scores"] for p in body["predictions"]], expected.scores, atol=1e-5)
    assert [p["label"] for p in body["predictions"]] == expected.labels
    by_embedding = client.post(
        "/v1/classify",
        json={
            "image_embeddings": image_encoder.embed(images).tolist(),
            "labels": LABELS,
            "templates": "a photo of a {}",
        },
    ).json()
    np.testing.assert_allclose([p["scores"] for p in by_embedding["predictions"]], expected.scores, atol=1e-5)


def test_retrieve_ranks_the_gallery_by_asif_similarity(asif_server, client, encoders):
    image_encoder, text_encoder = encoders
    service = asif_server.server.config.app.state.service
    images = pictures(5, seed=4)
    body = client.post(
        "/v1/retrieve",
        json={
            "queries": {"texts": ["cat", "a boat"]},
            "gallery": {"images": [b64(encode_image(i)) for i in images]},
            "top_k": 3,
        },
    ).json()
    reference = kci.ASIF(image_encoder, text_encoder, k=8, p=3.0, collection=service.collection)
    order, scores = reference.retrieve(
        reference.encode_texts(["cat", "a boat"]), reference.encode_images(images), top_k=3
    )
    assert [[m["index"] for m in row] for row in body["matches"]] == order.tolist()
    np.testing.assert_allclose([[m["score"] for m in row] for row in body["matches"]], scores, atol=1e-5)


def test_collection_changes_are_versioned_and_listed(encoders):
    image_encoder, text_encoder = encoders
    asif = kci.ASIF(image_encoder, text_encoder, k=4, p=2.0)
    server = serve(kci.serving.create_app(asif))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            empty = http.post("/v1/classify", json={"image_embeddings": [[1.0] * 24], "labels": ["cat"]})
            assert empty.status_code == 409 and "add pairs" in empty.json()["error"]
            rng = np.random.default_rng(0)
            added = http.post(
                "/v1/collections/pairs",
                json={
                    "ids": ["a", "b", "c"],
                    "captions": ["a cat", "a dog", "a car"],
                    "images": [b64(encode_image(p)) for p in pictures(3)],
                },
            ).json()
            assert added["collection"] == {"name": "default", "version": 1, "pairs": 3}
            more = http.post(
                "/v1/collections/pairs",
                json={"ids": ["d"], "captions": ["a tree"], "image_embeddings": unit_rows(rng, 1, 24).tolist()},
            ).json()
            assert more["collection"]["version"] == 2 and more["collection"]["pairs"] == 4
            removed = http.post("/v1/collections/remove", json={"ids": ["a", "c"]}).json()
            assert removed["collection"] == {"name": "default", "version": 3, "pairs": 2}
            listing = http.get("/v1/collections").json()
            assert listing["active"] == removed["collection"]
            assert {"name": "default", "language": "en", "pairs": 2} in listing["registered"]
            assert "emoji-it" in listing["available"] and listing["uris_allowed"] is False
            answer = http.post(
                "/v1/classify", json={"image_embeddings": unit_rows(rng, 2, 24).tolist(), "labels": ["cat", "dog"]}
            )
            assert answer.status_code == 200 and answer.json()["collection"]["version"] == 3
        assert asif.collection is None  # the server never edits the model it was given
    finally:
        server.stop()


def test_dual_encoder_is_served_without_collections(encoders):
    image_encoder, text_encoder = encoders
    model = kci.DualEncoder(image_encoder=image_encoder, text_encoder=text_encoder, projection_dim=8)
    server = serve(kci.serving.create_app(model))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            images = pictures(2, seed=5)
            body = http.post(
                "/v1/classify", json={"images": [b64(encode_image(i)) for i in images], "labels": ["cat", "dog"]}
            ).json()
            expected = model.encode_images(images) @ model.encode_texts(["cat", "dog"]).T
            np.testing.assert_allclose([p["scores"] for p in body["predictions"]], expected, atol=1e-5)
            assert body["collection"] == {"name": None, "version": None, "pairs": 0}
            refused = http.post("/v1/collections/activate", json={"name": "emoji-it"})
            assert refused.status_code == 409 and "DualEncoder" in refused.json()["error"]
    finally:
        server.stop()


def test_serve_command_parses_its_options():
    args = cli.build_parser().parse_args(
        ["serve", "--lang", "en", "--collection", "emoji-en", "--collection", "fashion-en", "--port", "9000"]
    )
    assert args.func.__module__ == "keras_clip_it.serving.commands"
    assert (args.lang, args.collection, args.port, args.host) == ("en", ["emoji-en", "fashion-en"], 9000, "127.0.0.1")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--lang", "fr"])
