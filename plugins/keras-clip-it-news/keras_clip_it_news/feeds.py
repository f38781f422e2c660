"""Reading RSS 2.0 and Atom feeds: the items that carry an image, with their dates.

Feeds come from the open internet, so the XML goes through defusedxml, which refuses DTDs, entity
expansion and external references (the "billion laughs" and XXE attacks the standard library's parsers
only partly guard against, depending on the Expat version installed), and downloads are size-capped.
"""

import datetime
import email.utils
import html
import mimetypes
import os
import re
import urllib.parse
import urllib.request
from typing import NamedTuple

import defusedxml.ElementTree
from defusedxml import DefusedXmlException

ATOM = "{http://www.w3.org/2005/Atom}"
MEDIA = "{http://search.yahoo.com/mrss/}"
MAX_FEED_BYTES = 20 * 1024 * 1024
TIMEOUT_SECONDS = 30
USER_AGENT = "keras-clip-it-news/0.1 (+https://pypi.org/project/keras-clip-it-news/)"


class FeedError(ValueError):
    """A feed could not be fetched or parsed; the message names the feed and what to do."""


class FeedItem(NamedTuple):
    """One feed entry with an image.

    Args:
        id: str, the entry's guid / Atom id (its link when it has none).
        title: str, the headline: the caption of the pair.
        summary: str, the description as plain text ("" when absent).
        link: str, the article's URL ("" when absent).
        published: timezone-aware datetime, or None when the feed gives no date.
        image: str, the image's absolute URL or path (relative references are resolved against the feed).
    """

    id: str
    title: str
    summary: str
    link: str
    published: datetime.datetime | None
    image: str


def read_bytes(location, limit=MAX_FEED_BYTES):
    """The bytes at a URL (http/https through urllib), an fsspec URI or a local path, at most `limit`.

    Args:
        location: str, where to read from.
        limit: int, the largest size accepted, in bytes.
    """
    scheme = urllib.parse.urlsplit(location).scheme
    try:
        if scheme in ("http", "https"):
            request = urllib.request.Request(location, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
                data = response.read(limit + 1)
        elif "://" in location:
            import fsspec

            with fsspec.open(location, "rb") as handle:
                data = handle.read(limit + 1)
        else:
            with open(location, "rb") as handle:
                data = handle.read(limit + 1)
    except (OSError, ValueError) as error:
        raise FeedError(
            f"could not read {location!r} ({type(error).__name__}: {error}); check the URL or path, and that "
            "this machine is online if it is a web address"
        ) from None
    if len(data) > limit:
        raise FeedError(f"{location!r} is larger than {limit:,} bytes; that is not a news feed or image")
    return data


def parse_feed(data, base):
    """The items of an RSS 2.0 or Atom document that have an image, in feed order.

    Args:
        data: bytes of the XML document.
        base: str, the feed's own URL or path, against which relative links and images are resolved.

    Returns:
        (items, skipped): a list of `FeedItem`, and the number of entries left out for having no image.
    """
    try:
        root = defusedxml.ElementTree.fromstring(data)
    except DefusedXmlException as error:
        raise FeedError(f"feed {base!r} uses XML entities or a DTD, refused for safety ({error})") from None
    except Exception as error:  # ParseError and friends: report the feed, not an XML traceback
        raise FeedError(f"feed {base!r} is not well-formed XML ({error}); check the URL points at a feed") from None
    if root.tag == "rss":
        entries, parse = root.iter("item"), _rss_item
    elif root.tag == f"{ATOM}feed":
        entries, parse = root.iter(f"{ATOM}entry"), _atom_entry
    else:
        raise FeedError(f"{base!r} is neither an RSS 2.0 (<rss>) nor an Atom (<feed>) document (root <{root.tag}>)")
    items, skipped = [], 0
    for entry in entries:
        item = parse(entry, base)
        if item is None:
            skipped += 1
        else:
            items.append(item)
    return items, skipped


def _rss_item(item, base):
    link = _text(item.find("link"))
    image = _media_image(item)
    if image is None:
        for enclosure in item.findall("enclosure"):
            if _is_image(enclosure.get("type"), enclosure.get("url")):
                image = enclosure.get("url")
                break
    published = _text(item.find("pubDate"))
    return _item(_text(item.find("guid")) or link, _text(item.find("title")), _text(item.find("description")),
                 link, _rss_date(published), image, base)


def _atom_entry(entry, base):
    link, image = "", _media_image(entry)
    for element in entry.findall(f"{ATOM}link"):
        relation = element.get("rel", "alternate")
        if relation == "alternate" and not link:
            link = element.get("href", "")
        elif relation == "enclosure" and image is None and _is_image(element.get("type"), element.get("href")):
            image = element.get("href")
    summary = _text(entry.find(f"{ATOM}summary")) or _text(entry.find(f"{ATOM}content"))
    published = _text(entry.find(f"{ATOM}published")) or _text(entry.find(f"{ATOM}updated"))
    return _item(_text(entry.find(f"{ATOM}id")) or link, _text(entry.find(f"{ATOM}title")), summary, link,
                 _iso_date(published), image, base)


def _item(item_id, title, summary, link, published, image, base):
    title = _plain(title)
    if not image or not (item_id or title):
        return None
    return FeedItem(
        id=item_id or title,
        title=title,
        summary=_plain(summary),
        link=_resolve(base, link) if link else "",
        published=published,
        image=_resolve(base, image),
    )


def _media_image(element):
    """The first Media RSS image (media:content, also inside media:group, then media:thumbnail)."""
    for content in element.iter(f"{MEDIA}content"):
        medium = content.get("medium")
        if medium == "image" or (medium is None and _is_image(content.get("type"), content.get("url"))):
            if content.get("url"):
                return content.get("url")
    for thumbnail in element.iter(f"{MEDIA}thumbnail"):
        if thumbnail.get("url"):
            return thumbnail.get("url")
    return None


def _is_image(mime, url):
    if mime:
        return mime.startswith("image/")
    guessed, _ = mimetypes.guess_type(urllib.parse.urlsplit(url or "").path)
    return bool(guessed and guessed.startswith("image/"))


def _resolve(base, reference):
    reference = reference.strip()
    if "://" in reference or os.path.isabs(reference):
        return reference
    if "://" in base:
        return urllib.parse.urljoin(base, reference)
    return os.path.join(os.path.dirname(os.path.abspath(base)), reference)


def _text(element):
    return (element.text or "").strip() if element is not None else ""


def _plain(text):
    """Feed text as plain text: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]*>", " ", text)).split())


def _rss_date(text):
    if not text:
        return None
    try:
        value = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)


def _iso_date(text):
    if not text:
        return None
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)
