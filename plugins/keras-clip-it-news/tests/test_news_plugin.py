import datetime
import functools
import http.server
import os
import threading

import numpy as np
import pytest

import keras_clip_it as kci
from keras_clip_it.data.images import load_images
from keras_clip_it_news import FeedError
from keras_clip_it_news import NewsSource
from keras_clip_it_news import news_pairs
from keras_clip_it_news import parse_feed
from keras_clip_it_news import sources
from keras_clip_it_news import update
from keras_clip_it_news.feeds import read_bytes

UTC = datetime.timezone.utc
DAY1 = datetime.datetime(2026, 3, 10, 12, tzinfo=UTC)
DAY2 = datetime.datetime(2026, 3, 16, 12, tzinfo=UTC)
WEEK = datetime.timedelta(days=7)


def _parse(fixture_path, name):
    path = fixture_path(name)
    with open(path, "rb") as handle:
        return parse_feed(handle.read(), base=path)


def _source(*feeds, window=WEEK):
    return NewsSource(name="news-test", feeds=feeds, language="it", window=window)


def test_rss_items_with_images_plain_text_and_dates(fixture_path):
    items, skipped = _parse(fixture_path, "rss_day1.xml")
    assert skipped == 1  # the item with no image
    assert [item.id for item in items] == ["art-piazza", "https://example.org/articoli/neve", "art-vendemmia"]
    piazza = items[0]
    assert piazza.title == "Il sindaco inaugura la nuova piazza & il mercato"
    assert piazza.summary == "Una festa in centro."
    assert piazza.published == datetime.datetime(2026, 3, 9, 17, 30, tzinfo=UTC)
    assert piazza.image == fixture_path(os.path.join("images", "rosso.png"))  # media:content, resolved
    assert items[1].image == fixture_path(os.path.join("images", "blu.png"))  # enclosure


def test_atom_entries_enclosure_thumbnail_and_published_over_updated(fixture_path):
    items, skipped = _parse(fixture_path, "atom.xml")
    assert skipped == 0
    sole, bici, _ = items
    assert sole.title == "Il sole torna sulla costa"
    assert sole.image.endswith("giallo.png") and sole.link == "https://example.org/cronaca/sole"
    assert sole.published == datetime.datetime(2026, 3, 10, 7, tzinfo=UTC)
    assert bici.image.endswith("verde.png") and bici.summary == "Dieci chilometri in più."


def test_unsafe_or_wrong_documents_are_clear_errors(fixture_path):
    with pytest.raises(FeedError, match="entities or a DTD"):
        _parse(fixture_path, "entities.xml")
    with pytest.raises(FeedError, match="not well-formed"):
        parse_feed(b"<rss><channel>", base="broken.xml")
    with pytest.raises(FeedError, match="neither an RSS 2.0"):
        parse_feed(b"<html><body/></html>", base="page.html")
    with pytest.raises(FeedError, match="could not read"):
        read_bytes(fixture_path("missing.xml"))
    with pytest.raises(FeedError, match="larger than 100 bytes"):
        read_bytes(fixture_path("rss_day1.xml"), limit=100)


def test_pairs_keep_the_window_and_skip_missing_images(fixture_path):
    source = _source(fixture_path("rss_day1.xml"), fixture_path("atom.xml"))
    with pytest.warns(UserWarning, match="image is unusable"):
        pairs = list(news_pairs(source, now=DAY1))
    assert [pair.caption for pair in pairs] == [
        "Il sindaco inaugura la nuova piazza & il mercato",
        "Treni in ritardo per la neve sulle Alpi",
        "Il sole torna sulla costa",
        "Nuove piste ciclabili in città",
    ]  # the month-old harvest is out of the window, the lost photo skipped
    assert pairs[0].metadata["published"] == "2026-03-09T18:30:00+01:00"
    assert load_images([pair.image for pair in pairs]).shape == (4, 24, 32, 3)


def test_update_adds_new_items_and_removes_old_ones(fixture_path):
    collection = kci.collections.AnalogyCollection(name="news-test", language="it")
    report = update(collection, _source(fixture_path("rss_day1.xml")), now=DAY1)
    assert report.added == ["art-piazza", "https://example.org/articoli/neve"] and report.removed == []
    report = update(collection, _source(fixture_path("rss_day2.xml")), now=DAY2)
    assert report.added == ["art-primavera"]
    assert report.removed == ["https://example.org/articoli/neve"]  # 8 March is more than a week before the 16th
    assert collection.ids == ["art-piazza", "art-primavera"]
    assert update(collection, _source(fixture_path("rss_day2.xml")), now=DAY2) == ([], [])


def test_update_of_a_stored_collection_writes_segments_not_a_copy(tmp_path, fixture_path):
    from keras_clip_it.collections import storage

    uri = str(tmp_path / "news-test")
    collection = kci.collections.AnalogyCollection(name="news-test", language="it")
    update(collection, _source(fixture_path("rss_day1.xml")), now=DAY1)
    collection.embed(text_encoder=Letters())
    storage.save_collection(collection, uri)
    report = update(uri, _source(fixture_path("rss_day2.xml")), now=DAY2, text_encoder=Letters())
    assert report == (["art-primavera"], ["https://example.org/articoli/neve"])
    stored = storage.open_collection(uri)
    assert stored.ids == ["art-piazza", "art-primavera"]
    np.testing.assert_allclose(stored.embeddings("text", Letters.fingerprint), Letters().embed(stored.captions), atol=1e-6)
    assert storage.info(uri)["counts"]["segments"] == 3  # the first, the new items, the tombstones


class MeanColour:
    """A small real image encoder for tests: the mean RGB colour, L2-normalised."""

    fingerprint = "mean-colour-v1"

    def __init__(self):
        self.embedded = 0

    def embed(self, images, batch_size=32):
        self.embedded += len(images)
        colour = load_images(images, size=(8, 8)).reshape(len(images), -1, 3).mean(axis=1) + 1.0
        return (colour / np.linalg.norm(colour, axis=1, keepdims=True)).astype("float32")


class Letters:
    """A small real text encoder for tests: letter counts, L2-normalised."""

    fingerprint = "letters-v1"

    def embed(self, texts, batch_size=64):
        counts = np.array([[text.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz"] for text in texts], "float32")
        return counts / np.maximum(np.linalg.norm(counts, axis=1, keepdims=True), 1e-6)


def test_update_embeds_only_the_new_items_with_the_collections_encoders(fixture_path):
    image_encoder, text_encoder = MeanColour(), Letters()
    collection = kci.collections.AnalogyCollection(name="news-test", language="it")
    update(collection, _source(fixture_path("rss_day1.xml")), now=DAY1)
    collection.embed(image_encoder=image_encoder, text_encoder=text_encoder)
    assert image_encoder.embedded == 2
    with pytest.raises(ValueError, match="pass image_encoder= with that fingerprint"):
        update(collection, _source(fixture_path("rss_day2.xml")), now=DAY2, text_encoder=text_encoder)
    assert len(collection) == 2  # nothing changed by the failed update
    update(collection, _source(fixture_path("rss_day2.xml")), now=DAY2, image_encoder=image_encoder,
           text_encoder=text_encoder)
    assert image_encoder.embedded == 3  # only "primavera" was embedded
    expected = image_encoder.embed([collection.image_refs[1]])
    np.testing.assert_allclose(collection.embeddings("image", MeanColour.fingerprint)[1:], expected, atol=1e-6)
    np.testing.assert_allclose(
        collection.embeddings("text", Letters.fingerprint), text_encoder.embed(collection.captions), atol=1e-6
    )


def test_configuration_file(tmp_path, fixture_path):
    config = tmp_path / "news.toml"
    config.write_text(
        f'[collections.cronaca-it]\nfeeds = ["{fixture_path("atom.xml")}"]\nwindow_days = 2.5\n'
        '[collections.notizie-it]\nfeeds = ["https://example.org/rss.xml"]\ndescription = "prova"\n'
    )
    cronaca, notizie = sources(str(config))
    assert cronaca.name == "cronaca-it" and cronaca.window == datetime.timedelta(days=2.5)
    assert cronaca.language == "it" and notizie.description == "prova"
    config.write_text('[collections.x]\nfeed = "https://example.org/rss.xml"\n')
    with pytest.raises(ValueError, match=r"unknown keys \['feed'\]"):
        sources(str(config))
    config.write_text('[collections.x]\nfeeds = []\n')
    with pytest.raises(ValueError, match="feeds must be a non-empty list"):
        sources(str(config))


def test_the_installed_plugin_registers_the_configured_collections(tmp_path, fixture_path, monkeypatch):
    assert "news-it" in kci.collections.available()  # the default, with no configuration
    config = tmp_path / "news.toml"
    # A long window: the fixture items are from March 2026, whatever day the test runs.
    config.write_text(f'[collections.prova-it]\nfeeds = ["{fixture_path("rss_day1.xml")}"]\nwindow_days = 100000\n')
    monkeypatch.setenv("KERAS_CLIP_IT_NEWS_CONFIG", str(config))
    assert "prova-it" in kci.collections.available() and "news-it" not in kci.collections.available()
    collection = kci.collections.load("prova-it")
    assert collection.ids == ["art-piazza", "https://example.org/articoli/neve", "art-vendemmia"]
    config.write_text("[collections.prova-it]\nfeeds = 3\n")
    with pytest.warns(UserWarning, match="plugin 'news' is broken"):
        assert "prova-it" not in kci.collections.available()
    assert "feeds must be a non-empty list" in kci.collections.broken()["news"]


@pytest.fixture
def web_server(fixture_path):
    """The fixtures served over HTTP on localhost, to exercise the download path with no internet."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=os.path.dirname(fixture_path("x")))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_web_feeds_and_images_are_downloaded_once_into_the_cache(web_server, tmp_path):
    source = _source(f"{web_server}/rss_day1.xml", f"{web_server}/atom.xml")
    with pytest.warns(UserWarning, match="persa.png"):  # a 404 image skips its item only
        pairs = list(news_pairs(source, now=DAY1))
    assert len(pairs) == 4
    cache = str(tmp_path / "cache")
    assert all(pair.image.startswith(cache) for pair in pairs)
    assert pairs[0].metadata["image_url"] == f"{web_server}/images/rosso.png"
    assert load_images([pairs[0].image])[0, 12, 16].tolist() == [200, 30, 30]
