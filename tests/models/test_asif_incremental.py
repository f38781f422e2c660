"""ASIF follows collection changes incrementally: same answers as a rebuild, no rebuild, consistent under threads."""

import threading

import numpy as np
import pytest

from keras_clip_it.collections import AnalogyCollection
from keras_clip_it.models import asif_state
from keras_clip_it.models.asif import ASIF
from tests.models.test_asif import VectorEncoder
from tests.models.test_asif import unit

IMAGE_DIM, TEXT_DIM = 24, 16


def pairs(n, start, seed):
    rng = np.random.default_rng(seed)
    ids = [f"id{i}" for i in range(start, start + n)]
    return ids, unit(rng.standard_normal((n, IMAGE_DIM))), unit(rng.standard_normal((n, TEXT_DIM)))


def model(k=30, **kwargs):
    # Uncentred, so that a followed model equals a rebuilt one exactly (a centred one keeps its centre
    # until the mean moves: test_asif_centering.py).
    kwargs.setdefault("center", False)
    return ASIF(VectorEncoder(IMAGE_DIM), VectorEncoder(TEXT_DIM), k=k, p=3.0, **kwargs)


def add(asif_or_collection, ids, image, text):
    if isinstance(asif_or_collection, ASIF):
        asif_or_collection.add(ids, image_embeddings=image, text_embeddings=text, captions=ids)
    else:
        embeddings = {"image": {f"vector-{IMAGE_DIM}": image}, "text": {f"vector-{TEXT_DIM}": text}}
        asif_or_collection.add(ids, captions=ids, embeddings=embeddings)


def rebuilt(collection, order=None):
    """A new ASIF over a new collection holding the same pairs (in `order` of ids, default the same rows)."""
    ids = collection.ids if order is None else order
    rows = collection.rows(ids)
    fresh = AnalogyCollection(name="rebuilt")
    image, text = collection.embeddings("image", f"vector-{IMAGE_DIM}"), collection.embeddings("text", f"vector-{TEXT_DIM}")
    add(fresh, ids, image[rows], text[rows])
    return model(collection=fresh)


def by_id(asif, representation):
    """Each row of a representation as {anchor id: weight}: independent of row numbering."""
    ids = np.asarray(asif.collection.ids)
    return [dict(zip(ids[rows].tolist(), values.tolist())) for rows, values in zip(representation.indices, representation.values)]


@pytest.fixture
def builds(monkeypatch):
    """Counts the anchor indexes ASIF builds from scratch."""
    count = []
    original = asif_state.AnchorIndex

    def counting(*args, **kwargs):
        count.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(asif_state, "AnchorIndex", counting)
    return count


def test_add_then_remove_follows_the_index_and_equals_a_rebuild(builds):
    rng = np.random.default_rng(0)
    queries, texts = unit(rng.standard_normal((7, IMAGE_DIM))), unit(rng.standard_normal((5, TEXT_DIM)))
    asif = model()
    add(asif, *pairs(900, 0, seed=1))
    asif.encode_images(embeddings=queries), asif.encode_texts(embeddings=texts)
    assert len(builds) == 2
    add(asif, *pairs(200, 900, seed=2))
    asif.remove([f"id{i}" for i in rng.choice(np.setdiff1d(np.arange(1100), [3, 950]), 250, replace=False)])
    add(asif, *pairs(30, 1100, seed=3))
    asif.remove(["id1105", "id3", "id950"])
    image_rep, text_rep = asif.encode_images(embeddings=queries), asif.encode_texts(embeddings=texts)
    assert len(builds) == 2, "the indexes followed the changes instead of being rebuilt"
    assert asif.index("image").size == len(asif.collection) == 877
    # Same collection rows: the same rows and weights, bit for bit.
    fresh = rebuilt(asif.collection)
    want_image, want_text = fresh.encode_images(embeddings=queries), fresh.encode_texts(embeddings=texts)
    np.testing.assert_array_equal(image_rep.indices, want_image.indices)
    np.testing.assert_array_equal(image_rep.values, want_image.values)
    np.testing.assert_array_equal(text_rep.indices, want_text.indices)
    np.testing.assert_array_equal(asif.similarity(image_rep, text_rep), fresh.similarity(want_image, want_text))
    # Another row order: the anchors behind each representation are the same ids with the same weights.
    shuffled = rebuilt(asif.collection, order=sorted(asif.collection.ids))
    got, want = by_id(asif, image_rep), by_id(shuffled, shuffled.encode_images(embeddings=queries))
    assert [sorted(g) for g in got] == [sorted(w) for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose([g[i] for i in sorted(g)], [w[i] for i in sorted(w)], rtol=1e-5, atol=1e-7)


def test_changes_made_on_the_collection_are_followed_on_the_next_query(builds):
    rng = np.random.default_rng(4)
    queries = unit(rng.standard_normal((3, IMAGE_DIM)))
    collection = AnalogyCollection(name="direct")
    add(collection, *pairs(500, 0, seed=5))
    asif = model(collection=collection)
    asif.encode_images(embeddings=queries)
    for step in range(5):  # several changes behind: replayed in order, ids added then removed included
        add(collection, *pairs(20, 500 + 20 * step, seed=6 + step))
        collection.remove([f"id{500 + 20 * step + 3}", f"id{step}"])
    collection.remove([f"id{i}" for i in range(505, 515)])
    got = asif.encode_images(embeddings=queries)
    assert len(builds) == 1
    want = rebuilt(collection).encode_images(embeddings=queries)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.values, want.values)
    # Replaced embeddings cannot be followed: the next query rebuilds.
    before = len(builds)
    collection.set_embeddings("image", f"vector-{IMAGE_DIM}", unit(rng.standard_normal((len(collection), IMAGE_DIM))))
    assert collection.changes_since(collection.version - 1) is None
    asif.encode_images(embeddings=queries)
    assert len(builds) == before + 1


def test_queries_during_adds_and_removes_see_the_old_or_the_new_collection():
    rng = np.random.default_rng(8)
    queries = unit(rng.standard_normal((2, IMAGE_DIM)))
    asif = model(k=20)
    add(asif, *pairs(600, 0, seed=9))
    gone = rng.permutation(600)
    changes = [
        ("add", pairs(40, 600 + 40 * i, seed=10 + i)) if i % 2 == 0 else ("remove", [f"id{j}" for j in gone[30 * i : 30 * i + 30]])
        for i in range(8)
    ]
    # The weights a query gets in each successive state, computed without any concurrency.
    serial = model(k=20)
    add(serial, *pairs(600, 0, seed=9))
    expected = [serial.encode_images(embeddings=queries).values]
    for change, value in changes:
        add(serial, *value) if change == "add" else serial.remove(value)
        expected.append(serial.encode_images(embeddings=queries).values)
    asif.encode_images(embeddings=queries)
    seen, errors, done = [], [], threading.Event()

    def reader():
        try:
            while not done.is_set():
                seen.append(asif.relative(queries, "image").values)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for change, value in changes:
        add(asif, *value) if change == "add" else asif.remove(value)
    done.set()
    for thread in threads:
        thread.join()
    assert not errors and seen
    for values in seen:
        assert any(np.array_equal(values, state) for state in expected), "a query saw a mix of two states"
    np.testing.assert_array_equal(asif.encode_images(embeddings=queries).values, expected[-1])


def test_removing_every_pair_then_adding_again():
    rng = np.random.default_rng(11)
    queries = unit(rng.standard_normal((2, IMAGE_DIM)))
    asif = model()
    ids, image, text = pairs(40, 0, seed=12)
    add(asif, ids, image, text)
    asif.encode_images(embeddings=queries)
    asif.remove(ids)
    assert len(asif.collection) == 0
    with pytest.raises(ValueError, match="no anchors yet"):
        asif.encode_images(embeddings=queries)
    add(asif, *pairs(30, 40, seed=13))
    got = asif.encode_images(embeddings=queries)
    want = rebuilt(asif.collection).encode_images(embeddings=queries)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.values, want.values)


def collection_of(name, n, seed):
    collection = AnalogyCollection(name=name)
    add(collection, *pairs(n, 0, seed=seed))
    return collection


def test_swapping_between_kept_collections_builds_nothing(builds):
    rng = np.random.default_rng(14)
    queries = unit(rng.standard_normal((3, IMAGE_DIM)))
    first, second = collection_of("first", 300, seed=15), collection_of("second", 400, seed=16)
    asif = model(collection=first)
    asif.encode_images(embeddings=queries)
    assert asif.prepare(second) is second and len(builds) == 3  # first's image index, second's two
    assert asif.collection is first, "prepare builds ahead, it does not swap"
    for target in (second, first, second):
        asif.use(target)
        got = asif.encode_images(embeddings=queries)
        want = model(collection=target).encode_images(embeddings=queries)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.values, want.values)
    assert len(builds) == 3 + 3, "only the three fresh models above built indexes"
    # Changes made while a collection is not current are followed when it comes back, not rebuilt.
    add(first, *pairs(20, 300, seed=17))
    first.remove(["id7", "id301"])
    before = len(builds)
    asif.use(first)
    got = asif.encode_images(embeddings=queries)
    assert len(builds) == before
    np.testing.assert_array_equal(got.values, rebuilt(first).encode_images(embeddings=queries).values)


def test_kept_collections_are_bounded_and_the_current_one_stays(builds):
    queries = unit(np.random.default_rng(18).standard_normal((2, IMAGE_DIM)))
    first, second, third = (collection_of(name, 200, seed) for name, seed in (("a", 19), ("b", 20), ("c", 21)))
    asif = model(collection=first, keep_collections=2)
    asif.encode_images(embeddings=queries)
    asif.prepare(second)
    asif.prepare(third)  # over the bound: the oldest that is not current (second) is dropped
    before = len(builds)
    asif.use(first)
    asif.encode_images(embeddings=queries)
    asif.use(third)
    asif.encode_images(embeddings=queries)
    assert len(builds) == before
    asif.use(second)
    asif.encode_images(embeddings=queries)
    assert len(builds) == before + 1
    with pytest.raises(ValueError, match="keep_collections"):
        model(keep_collections=0)


def test_a_representation_of_another_collection_is_refused():
    queries = unit(np.random.default_rng(22).standard_normal((2, IMAGE_DIM)))
    texts = unit(np.random.default_rng(23).standard_normal((2, TEXT_DIM)))
    first, second = collection_of("first", 100, seed=24), collection_of("second", 100, seed=25)
    asif = model(collection=first)
    old = asif.encode_images(embeddings=queries)
    asif.use(second)  # same version number, other anchors
    assert old.version == second.version
    with pytest.raises(ValueError, match="another collection"):
        asif.similarity(old, asif.encode_texts(embeddings=texts))


def test_queries_during_swaps_see_one_collection_or_the_other():
    rng = np.random.default_rng(26)
    queries = unit(rng.standard_normal((2, IMAGE_DIM)))
    first, second = collection_of("first", 500, seed=27), collection_of("second", 700, seed=28)
    expected = {
        c.uid: (lambda rep: (rep.indices, rep.values))(model(k=20, collection=c).encode_images(embeddings=queries))
        for c in (first, second)
    }
    asif = model(k=20, collection=first)
    asif.prepare(second)
    seen, errors, done = [], [], threading.Event()

    def reader():
        try:
            while not done.is_set():
                seen.append(asif.relative(queries, "image"))
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for step in range(40):
        asif.use(second if step % 2 == 0 else first)
    done.set()
    for thread in threads:
        thread.join()
    assert not errors and seen
    for rep in seen:
        indices, values = expected[rep.collection]
        assert np.array_equal(rep.indices, indices) and np.array_equal(rep.values, values), "a mix of two collections"
