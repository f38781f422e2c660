"""News collections: configured feeds, their recent items as pairs, and the incremental update.

ASIF's model *is* its collection, so keeping up with the news means adding the new items and dropping
the old ones, not retraining: `update` does exactly that, embedding only the new items.
"""

import datetime
import hashlib
import mimetypes
import os
import tomllib
import urllib.parse
import warnings
from typing import NamedTuple

from keras_clip_it.collections import RawPair
from keras_clip_it.collections import storage
from keras_clip_it.collections.registry import prepare_pairs

from keras_clip_it_news.feeds import FeedError
from keras_clip_it_news.feeds import parse_feed
from keras_clip_it_news.feeds import read_bytes

MAX_IMAGE_BYTES = 10 * 1024 * 1024
CONFIG_ENV = "KERAS_CLIP_IT_NEWS_CONFIG"
DEFAULT_CONFIG = os.path.join("~", ".config", "keras-clip-it", "news.toml")


class NewsSource(NamedTuple):
    """One news collection: its feeds, caption language and how long items stay in it.

    Args:
        name: str, the collection name ("news-it").
        feeds: tuple of str, feed URLs, fsspec URIs or local paths, read in order.
        language: str, language of the headlines.
        window: datetime.timedelta, items older than this are left out (and removed by `update`).
        description: str.
    """

    name: str
    feeds: tuple
    language: str
    window: datetime.timedelta
    description: str = ""


# la Repubblica's front-page RSS carries an image per article; any other feed can be configured.
DEFAULT_SOURCES = (
    NewsSource(
        name="news-it",
        feeds=("https://www.repubblica.it/rss/homepage/rss2.0.xml",),
        language="it",
        window=datetime.timedelta(days=7),
        description="la Repubblica front page, the last 7 days: headlines with their photos (needs internet)",
    ),
)


class UpdateReport(NamedTuple):
    """What `update` changed: the ids added and the ids removed."""

    added: list
    removed: list


def sources(config_path=None):
    """The configured news collections, or `DEFAULT_SOURCES` when there is no configuration file.

    The file is TOML, at `config_path`, else $KERAS_CLIP_IT_NEWS_CONFIG, else
    ~/.config/keras-clip-it/news.toml; each table under [collections] is one collection.

    Args:
        config_path: str or None.

    Example:
    >>> [source.name for source in sources("/no/such/file.toml")]
    ['news-it']
    """
    path = os.path.expanduser(config_path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    if not os.path.exists(path):
        return DEFAULT_SOURCES
    try:
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"news configuration {path}: not valid TOML ({error})") from None
    tables = config.get("collections")
    if not isinstance(tables, dict) or not tables:
        raise ValueError(f"news configuration {path}: add at least one [collections.NAME] table with feeds = [...]")
    result = []
    for name, table in tables.items():
        where = f"news configuration {path}, [collections.{name}]"
        unknown = set(table) - {"feeds", "language", "window_days", "description"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; use feeds, language, window_days, description")
        feeds = table.get("feeds")
        if not isinstance(feeds, list) or not feeds or not all(isinstance(f, str) and f for f in feeds):
            raise ValueError(f"{where}: feeds must be a non-empty list of feed URLs or paths")
        window_days = table.get("window_days", 7)
        if not isinstance(window_days, (int, float)) or window_days <= 0:
            raise ValueError(f"{where}: window_days must be a positive number, got {window_days!r}")
        result.append(
            NewsSource(
                name=name,
                feeds=tuple(feeds),
                language=str(table.get("language", "it")),
                window=datetime.timedelta(days=window_days),
                description=str(table.get("description", f"news from {', '.join(feeds)}")),
            )
        )
    return tuple(result)


def source_named(name, config_path=None):
    """The configured `NewsSource` called `name`; an unknown name is an error listing the known ones."""
    known = {source.name: source for source in sources(config_path)}
    if name not in known:
        raise KeyError(f"no news collection {name!r} is configured; configured: {sorted(known)}")
    return known[name]


def news_pairs(source, now=None):
    """Yields the pairs of `source`'s feed items published within its window, in feed order.

    An item whose image cannot be read is skipped with a warning naming it (a news feed always has a
    few broken links), so one bad item never blocks the update of the rest.

    Args:
        source: a `NewsSource`.
        now: timezone-aware datetime, the reference time for the window (default: now, UTC).
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    cutoff = now - source.window
    seen = set()
    for feed in source.feeds:
        items, _ = parse_feed(read_bytes(feed), base=feed)
        for item in items:
            # Undated items count as published when first seen: they stay while the feed lists them.
            published = item.published or now
            if item.id in seen or published < cutoff:
                continue
            seen.add(item.id)
            try:
                image = _local_image(item.image)
            except FeedError as error:
                warnings.warn(f"{source.name}: item {item.id!r} skipped, its image is unusable: {error}")
                continue
            metadata = {
                "published": published.isoformat(),
                "link": item.link,
                "summary": item.summary,
                "feed": feed,
                "image_url": item.image,
            }
            yield RawPair(item.id, item.title, image, metadata)


def update(collection, source, now=None, image_encoder=None, text_encoder=None, batch_size=32):
    """Brings a news collection up to date: adds new items, removes those older than the window.

    Only the new items are embedded. If the collection already holds embeddings, pass the encoders that
    made them (their fingerprints must match), so the new rows are embedded the same way. A stored
    collection (a URI) is changed incrementally, with one new segment and one tombstone segment, not
    rewritten.

    Args:
        collection: an `AnalogyCollection` built from this source (`kci.collections.load("news-it")`), or
            the fsspec URI / path of one stored with `kci.collections.storage.save_collection`.
        source: a `NewsSource` or the name of a configured one.
        now: timezone-aware datetime (default: now, UTC).
        image_encoder: the image encoder of the collection's image embeddings, if it has any.
        text_encoder: likewise for the text embeddings.
        batch_size: images per encoder batch.

    Returns:
        An `UpdateReport` with the ids added and removed.

    Example:
    >>> report = update("/data/news-it", "news-it", image_encoder=img, text_encoder=txt)   # doctest: +SKIP
    >>> len(report.added), len(report.removed)   # doctest: +SKIP
    (12, 9)
    """
    source = source_named(source) if isinstance(source, str) else source
    now = now or datetime.datetime.now(datetime.timezone.utc)
    uri = os.fspath(collection) if isinstance(collection, (str, os.PathLike)) else None
    if uri is not None:
        collection = storage.open_collection(uri)
    cutoff = now - source.window
    present = set(collection.ids)
    stale = [
        pair_id
        for pair_id, metadata in zip(collection.ids, collection.metadata)
        if "published" in metadata and datetime.datetime.fromisoformat(metadata["published"]) < cutoff
    ]
    fresh = [pair for pair in news_pairs(source, now) if pair.id not in present]
    # Everything is embedded before anything changes, so a failing encoder leaves the collection as it was.
    columns = prepare_pairs(collection.name, collection.fingerprints, fresh, image_encoder, text_encoder, batch_size)
    if uri is None:
        if columns["ids"]:
            collection.add(**columns)
        if stale:
            collection.remove(stale)
    else:
        if columns["ids"]:
            storage.append(uri, **columns)
        if stale:
            storage.remove(uri, stale)
    return UpdateReport(added=columns["ids"], removed=stale)


def _local_image(location):
    """A readable path or URI for an item's image: web images are downloaded once into the cache."""
    scheme = urllib.parse.urlsplit(location).scheme
    if scheme not in ("http", "https"):
        if "://" not in location and not os.path.exists(location):
            raise FeedError(f"{location!r} does not exist")
        return location
    from keras_clip_it.cache import cache_dir

    extension = os.path.splitext(urllib.parse.urlsplit(location).path)[1].lower()
    if not mimetypes.guess_type(f"x{extension}")[0]:
        extension = ".img"
    folder = cache_dir("news", "images")
    path = os.path.join(folder, hashlib.sha1(location.encode()).hexdigest() + extension)
    if not os.path.exists(path):
        data = read_bytes(location, limit=MAX_IMAGE_BYTES)
        os.makedirs(folder, exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    return path
