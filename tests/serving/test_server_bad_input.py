"""A corpus of bad requests, each refused with the expected 4xx and a JSON error; the server stays healthy."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.serving.conftest import LABELS
from tests.serving.conftest import b64
from tests.serving.conftest import encode_image

IMAGE_DIM = 24  # the test image encoder's embedding size
PICTURE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def png_claiming(width, height):
    """A valid PNG header (signature, IHDR with correct CRC) claiming width x height pixels, a few bytes long."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def classify_images(*files):
    return {"json": {"images": [b64(f) for f in files], "labels": LABELS}}


def classify_raw(text):
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def vector(values):
    return "[" + ", ".join(values) + "]"


JPEG = encode_image(PICTURE, "JPEG")
PNG = encode_image(PICTURE, "PNG")
ONES = ["0.2"] * (IMAGE_DIM - 1)

CASES = {
    "truncated JPEG": ("/v1/classify", classify_images(JPEG[: len(JPEG) // 2]), 422),
    "truncated PNG": ("/v1/classify", classify_images(PNG[: len(PNG) // 2]), 422),
    "JPEG cut after its header": ("/v1/embed", {"json": {"images": [b64(JPEG[:200])]}}, 422),
    "zero-size file": ("/v1/classify", {"json": {"images": [""], "labels": LABELS}}, 422),
    "zero-size file as a data URL": ("/v1/embed", {"json": {"images": ["data:image/png;base64,"]}}, 422),
    "PNG header claiming 50k x 50k pixels": ("/v1/classify", classify_images(png_claiming(50_000, 50_000)), 413),
    "PNG header over the server's pixel limit": (
        "/v1/embed",
        {"json": {"images": [b64(png_claiming(5000, 5000))]}},
        413,
    ),
    "random bytes as an image": ("/v1/embed", {"json": {"images": [b64(bytes(range(256)) * 4)]}}, 422),
    "invalid base64": ("/v1/embed", {"json": {"images": ["not*base64!"]}}, 422),
    "text/plain body": ("/v1/classify", {"content": b"labels=cat", "headers": {"content-type": "text/plain"}}, 415),
    "multipart upload": ("/v1/embed", {"files": {"images": ("cat.png", PNG, "image/png")}}, 415),
    "image/png body": ("/v1/embed", {"content": PNG, "headers": {"content-type": "image/png"}}, 415),
    "JSON without a content type": (
        "/v1/embed",
        {"content": b'{"texts": ["cat"]}', "headers": {"content-type": ""}},
        415,
    ),
    "invalid UTF-8": (
        "/v1/embed",
        {"content": b'{"texts": ["caf\xe8"]}', "headers": {"content-type": "application/json"}},
        400,
    ),
    "unpaired surrogate": ("/v1/embed", classify_raw('{"texts": ["\\ud800"]}'), 422),
    "JSON nested 100k deep": ("/v1/embed", classify_raw("[" * 100_000 + "]" * 100_000), 400),
    "truncated JSON": ("/v1/embed", classify_raw('{"texts": ["cat"'), 422),
    "huge JSON": ("/v1/embed", {"json": {"texts": ["cat " * 300] * 1000}}, 413),
    "huge JSON without a length (chunked)": (
        "/v1/embed",
        {
            "content": iter([b'{"texts": ["' + b"x" * 2**19, b"y" * 2**19, b'z"]}']),
            "headers": {"content-type": "application/json"},
        },
        413,
    ),
    "NaN embedding": (
        "/v1/classify",
        classify_raw('{"labels": ["cat"], "image_embeddings": [%s]}' % vector(["NaN"] + ONES)),
        422,
    ),
    "Infinity embedding": (
        "/v1/classify",
        classify_raw('{"labels": ["cat"], "image_embeddings": [%s]}' % vector(["-Infinity"] + ONES)),
        422,
    ),
    "embedding overflowing float32": (
        "/v1/classify",
        classify_raw('{"labels": ["cat"], "image_embeddings": [%s]}' % vector(["1e39"] + ONES)),
        422,
    ),
    "wrong-dimension embedding": (
        "/v1/classify",
        {"json": {"labels": ["cat"], "image_embeddings": [[0.1] * (IMAGE_DIM + 1)]}},
        422,
    ),
    "ragged embeddings": (
        "/v1/classify",
        {"json": {"labels": ["cat"], "image_embeddings": [[0.1] * IMAGE_DIM, [0.1] * 3]}},
        422,
    ),
    "zero embedding": ("/v1/classify", {"json": {"labels": ["cat"], "image_embeddings": [[0.0] * IMAGE_DIM]}}, 422),
    "string embedding values": (
        "/v1/classify",
        {"json": {"labels": ["cat"], "image_embeddings": [["a"] * IMAGE_DIM]}},
        422,
    ),
    "too many images": ("/v1/embed", {"json": {"images": ["AAAA"] * 65}}, 422),
    "caption too long": ("/v1/embed", {"json": {"texts": ["x" * 2001]}}, 422),
    "no labels": ("/v1/classify", {"json": {"image_embeddings": [[0.1] * IMAGE_DIM], "labels": []}}, 422),
    "labels as one string": ("/v1/classify", {"json": {"image_embeddings": [[0.1] * IMAGE_DIM], "labels": "cat"}}, 422),
    "repeated labels": (
        "/v1/classify",
        {"json": {"image_embeddings": [[0.1] * IMAGE_DIM], "labels": ["cat", "cat"]}},
        422,
    ),
    "template without {}": (
        "/v1/classify",
        {"json": {"image_embeddings": [[0.1] * IMAGE_DIM], "labels": ["cat"], "templates": "a photo"}},
        422,
    ),
    "template with a named field": (
        "/v1/classify",
        {"json": {"image_embeddings": [[0.1] * IMAGE_DIM], "labels": ["cat"], "templates": ["{} {x}"]}},
        422,
    ),
    "too many captions": (
        "/v1/classify",
        {"json": {"image_embeddings": [[0.1] * IMAGE_DIM], "labels": [f"l{i}" for i in range(60)], "templates": "en"}},
        413,
    ),
    "images and embeddings together": (
        "/v1/classify",
        {"json": {"images": [b64(PNG)], "image_embeddings": [[0.1] * IMAGE_DIM], "labels": ["cat"]}},
        422,
    ),
    "unknown field": ("/v1/embed", {"json": {"texts": ["cat"], "normalize": False}}, 422),
    "JSON array instead of an object": ("/v1/embed", {"json": ["cat"]}, 422),
    "top_k of zero": (
        "/v1/retrieve",
        {"json": {"queries": {"texts": ["cat"]}, "gallery": {"texts": ["dog"]}, "top_k": 0}},
        422,
    ),
    "unknown collection": ("/v1/collections/activate", {"json": {"name": "no-such-collection"}}, 404),
    "collection path": ("/v1/collections/activate", {"json": {"name": "/etc"}}, 403),
    "collection URI": ("/v1/collections/activate", {"json": {"name": "file:///etc"}}, 403),
    "removing unknown ids": ("/v1/collections/remove", {"json": {"ids": ["no-such-id"]}}, 404),
    "adding an existing id": (
        "/v1/collections/pairs",
        {"json": {"ids": ["alpha-0"], "captions": ["x"], "image_embeddings": [[0.1] * IMAGE_DIM]}},
        409,
    ),
    "repeated ids": (
        "/v1/collections/pairs",
        {"json": {"ids": ["n", "n"], "captions": ["x", "y"], "image_embeddings": [[0.1] * IMAGE_DIM] * 2}},
        409,
    ),
    "captions not aligned with ids": (
        "/v1/collections/pairs",
        {"json": {"ids": ["n1", "n2"], "captions": ["x"], "image_embeddings": [[0.1] * IMAGE_DIM] * 2}},
        422,
    ),
    "GET on a POST endpoint": ("/v1/classify", {"method": "GET"}, 405),
    "unknown path": ("/v2/classify", {"json": {}}, 404),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_a_json_4xx(client, case):
    path, request, status = CASES[case]
    request = dict(request)
    method = request.pop("method", "POST")
    response = client.request(method, path, **request)
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"] and body["type"]


def test_server_still_answers_after_the_corpus(client):
    for case in CASES.values():  # the whole corpus again, back to back, then a good request
        path, request, _ = case
        request = dict(request)
        client.request(request.pop("method", "POST"), path, **request)
    health = client.get("/health")
    assert health.status_code == 200
    good = client.post("/v1/classify", json={"images": [b64(PNG)], "labels": LABELS})
    assert good.status_code == 200 and len(good.json()["predictions"]) == 1


def test_error_messages_say_what_to_do(client):
    bomb = client.post("/v1/embed", json={"images": [b64(png_claiming(5000, 5000))]}).json()
    assert "5000x5000" in bomb["error"] and "resize" in bomb["error"]
    truncated = client.post("/v1/embed", json={"images": [b64(PNG), b64(JPEG[: len(JPEG) // 2])]}).json()
    assert "images[1]" in truncated["error"]
    wrong = client.post("/v1/classify", json={"labels": ["cat"], "image_embeddings": [[0.1] * 7]}).json()
    assert "7" in wrong["error"] and str(IMAGE_DIM) in wrong["error"]
    schema = client.post("/v1/embed", json={"texts": ["x" * 2001]}).json()
    assert schema["details"][0]["loc"] == ["body", "texts", "0"]
    json.dumps(schema)  # details are plain JSON, never echoing the offending input back
    assert "xxxx" not in json.dumps(schema)
