"""A real uvicorn server on loopback around small real models, and a real HTTP client.

The towers are a small random convolutional network (32 x 32 images) and a two-layer BERT over a
fixed vocabulary: real `kci.ImageEncoder` / `kci.TextEncoder` code paths (decoding, resizing,
tokenising, batching) that compile in seconds. Collections hold seeded random unit embeddings, so a
test can recompute every expected score with numpy.
"""

import base64
import io
import socket
import threading
import time

import httpx
import keras
import keras_hub
import numpy as np
import pytest
import uvicorn
from PIL import Image

import keras_clip_it as kci
from keras_clip_it.collections import AnalogyCollection
from keras_clip_it.encoders.minilm.hf_bert_tokenizer import HFBertTokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "cat", "dog", "car", "tree", "boat"]
LABELS = ["cat", "dog", "car", "tree", "boat"]


def make_image_encoder():
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential(
        [keras.layers.Conv2D(8, 3, strides=2, activation="relu"), keras.layers.Conv2D(24, 3, strides=2)]
    )
    return kci.ImageEncoder(backbone, image_size=32, crop_pct=1.0)


def make_text_encoder():
    keras.utils.set_random_seed(1)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCAB),
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=64,
        dropout=0.0,
    )
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(HFBertTokenizer(VOCAB), sequence_length=32)
    return kci.TextEncoder(backbone, preprocessor)


def unit_rows(rng, count, dim):
    rows = rng.standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def random_collection(name, size, image_encoder, text_encoder, seed):
    """A collection of `size` pairs with seeded random unit embeddings for both encoders."""
    rng = np.random.default_rng(seed)
    collection = AnalogyCollection(name=name, language="en")
    collection.add(
        [f"{name}-{i}" for i in range(size)],
        captions=[f"{name} caption {i}" for i in range(size)],
        embeddings={
            "image": {image_encoder.fingerprint: unit_rows(rng, size, image_encoder.embedding_dim)},
            "text": {text_encoder.fingerprint: unit_rows(rng, size, text_encoder.embedding_dim)},
        },
    )
    return collection


def encode_image(array, fmt="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data):
    return base64.b64encode(data).decode("ascii")


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 at a free port, in a thread, until `stop()`."""

    def __init__(self, app):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


@pytest.fixture(scope="session")
def encoders():
    return make_image_encoder(), make_text_encoder()


def serve(app):
    server = ServerThread(app).start()
    return server


@pytest.fixture(scope="module")
def asif_server(encoders):
    """An ASIF (k=8, p=3) serving collection "alpha" (40 pairs), with "beta" (30 pairs) registered too."""
    image_encoder, text_encoder = encoders
    alpha = random_collection("alpha", 40, image_encoder, text_encoder, seed=1)
    beta = random_collection("beta", 30, image_encoder, text_encoder, seed=2)
    asif = kci.ASIF(image_encoder, text_encoder, k=8, p=3.0, collection=alpha)
    app = kci.serving.create_app(asif, collections=[beta], limits=kci.serving.Limits(body_bytes=2**20))
    server = serve(app)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(asif_server):
    with httpx.Client(base_url=asif_server.url, timeout=60) as http:
        yield http
