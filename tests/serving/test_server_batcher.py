"""Micro-batching of encoder calls: every caller gets its own rows, batches stay bounded, workers overlap."""

import threading
import time

import keras
import numpy as np
import pytest

from keras_clip_it.serving import commands
from keras_clip_it.serving.batcher import Batcher


class Recorder:
    """An encoder stand-in that doubles its inputs slowly and records batch sizes and overlapping calls."""

    def __init__(self):
        self.sizes, self.running, self.most_running = [], 0, 0
        self.lock = threading.Lock()

    def __call__(self, items):
        with self.lock:
            self.sizes.append(len(items))
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        return np.asarray(items, np.float32)[:, None] * 2


def call_concurrently(batcher, callers):
    results = {}

    def call(number):
        results[number] = batcher([number * 10 + i for i in range(number % 3 + 1)])

    threads = [threading.Thread(target=call, args=(number,)) for number in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batcher.stop()
    return results


@pytest.mark.parametrize("workers", [1, 2])
def test_each_caller_gets_its_rows_in_bounded_batches(workers):
    recorder = Recorder()
    results = call_concurrently(Batcher(recorder, max_items=4, workers=workers), callers=12)
    for number, rows in results.items():
        expected = [2.0 * (number * 10 + i) for i in range(number % 3 + 1)]
        np.testing.assert_array_equal(rows[:, 0], expected)
    assert sum(recorder.sizes) == sum(number % 3 + 1 for number in range(12))
    # A caller's items are never split and never make a batch larger than max_items.
    assert max(recorder.sizes) <= 4 and len(recorder.sizes) < 12
    assert recorder.most_running == workers


def test_errors_reach_every_caller_of_the_batch_and_bad_settings_are_named():
    def fail(items):
        raise RuntimeError("encoder failed")

    batcher = Batcher(fail, max_items=4)
    with pytest.raises(RuntimeError, match="encoder failed"):
        batcher([1])
    batcher.stop()
    big = Batcher(Recorder(), max_items=2)  # a single job larger than the batch runs alone
    np.testing.assert_array_equal(big([1, 2, 3])[:, 0], [2.0, 4.0, 6.0])
    big.stop()
    with pytest.raises(ValueError, match="encoder_workers"):
        Batcher(fail, max_items=4, workers=0)
    with pytest.raises(ValueError, match="encoder_batch"):
        Batcher(fail, max_items=0)


def test_serve_switches_backend_only_when_it_can_restart():
    current = keras.backend.backend()
    assert commands.use_backend(current) is None  # nothing to do
    other = next(backend for backend in commands.BACKENDS if backend != current)
    with pytest.raises(ValueError, match=f"KERAS_BACKEND={other}"):
        commands.use_backend(other)  # pytest's command line is not `serve`: it cannot restart itself


def test_concurrent_requests_with_new_labels_embed_them_once(encoders):
    import keras_clip_it as kci
    from tests.serving.conftest import LABELS
    from tests.serving.conftest import random_collection
    from tests.serving.conftest import unit_rows

    image_encoder, text_encoder = encoders
    collection = random_collection("alpha", 30, image_encoder, text_encoder, seed=6)
    service = kci.serving.create_app(kci.ASIF(image_encoder, text_encoder, k=4, collection=collection)).state.service
    calls, embed = [], service._embed_texts

    def slow_embed(texts):
        calls.append(list(texts))
        time.sleep(0.2)  # every request arrives while the first embedding runs
        return embed(texts)

    service._embed_texts = slow_embed
    queries = unit_rows(np.random.default_rng(0), 2, image_encoder.embedding_dim).tolist()
    answers = []

    def classify():
        answers.append(service.classify(LABELS, "a photo of a {}", image_embeddings=queries))

    threads = [threading.Thread(target=classify) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(answers) == 8
    assert all(answer["predictions"] == answers[0]["predictions"] for answer in answers)
    service._embed_texts = embed
    service.stop()


def test_batches_fill_the_padded_sizes_exactly():
    """Three waiting images run as two and one: the encoders would pad three to four."""
    started, release, sizes = threading.Event(), threading.Event(), []

    def embed(items):
        sizes.append(len(items))
        started.set()
        release.wait(10)
        return np.asarray(items, np.float32)[:, None]

    batcher = Batcher(embed, max_items=4)
    first = threading.Thread(target=batcher, args=([0],))
    first.start()
    started.wait(10)  # the worker is busy: the next jobs queue up behind it
    waiting = [threading.Thread(target=batcher, args=([number],)) for number in (1, 2, 3)]
    for thread in waiting:
        thread.start()
    deadline = time.monotonic() + 10
    while len(batcher._jobs) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in [first, *waiting]:
        thread.join()
    batcher.stop()
    assert sizes == [1, 2, 1]


def test_label_scores_are_the_same_dense_and_sparse(encoders, monkeypatch):
    import keras_clip_it as kci
    from keras_clip_it.models import asif_state
    from tests.serving.conftest import LABELS
    from tests.serving.conftest import random_collection
    from tests.serving.conftest import unit_rows

    image_encoder, text_encoder = encoders
    collection = random_collection("alpha", 30, image_encoder, text_encoder, seed=7)
    queries = unit_rows(np.random.default_rng(1), 3, image_encoder.embedding_dim).tolist()
    answers = []
    for limit in (asif_state._DENSE_LABELS, 0):  # 0: every label set takes the sparse join
        monkeypatch.setattr(asif_state, "_DENSE_LABELS", limit)
        asif = kci.ASIF(image_encoder, text_encoder, k=6, p=3.0, collection=collection)
        service = kci.serving.create_app(asif).state.service
        answers.append([p["scores"] for p in service.classify(LABELS, None, image_embeddings=queries)["predictions"]])
        assert (service.snapshot._classes[(tuple(LABELS), None, asif.label_pooling)][1] is None) == (limit == 0)
        service.stop()
    np.testing.assert_allclose(answers[0], answers[1], atol=1e-6)
