"""What a plugin registers: a named collection spec and the raw (image, caption) pairs it yields."""

import dataclasses
import json
import os
import re
from typing import Any
from typing import NamedTuple

import numpy as np

# Names travel through CLIs, URIs and file names: one lowercase token with no path separators keeps them
# unambiguous against the fsspec URIs that `load` also accepts.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class RawPair(NamedTuple):
    """One image-caption pair, as a plugin yields it, before any encoder has seen it.

    Args:
        id: str, stable and unique within the collection (a feed item's guid, a Wikidata item, ...).
        caption: str, the text side of the pair.
        image: an fsspec URI or local path of an image file, or a pixel array (H, W), (H, W, 1|3|4).
        metadata: dict of JSON values kept with the pair (link, date, label, ...), or None.
    """

    id: str
    caption: str
    image: Any
    metadata: dict | None = None


@dataclasses.dataclass(frozen=True)
class CollectionSpec:
    """A collection a plugin contributes: who made it, under what licence, and how to get its pairs.

    A spec is cheap: listing collections never reads data. The pairs are obtained only when the
    collection is loaded, and the core embeds them with whatever encoders are in use, so one plugin serves
    any pair of encoders.

    Args:
        name: str, lowercase, e.g. "films-it" (letters, digits, ".", "_", "-"; at most 64 characters).
        language: str, language code of the captions ("it", "en", ...).
        pairs: a function returning an iterable of `RawPair` (or (id, caption, image[, metadata])
            tuples), or a re-iterable object (a list, or a class with `__iter__`) yielding them.
        description: str, one line a user reads in `keras-clip-it collections list`.
        source: str, where the data comes from (a URL, a dataset name).
        licence: str, the data's licence.

    Example:
    >>> spec = CollectionSpec("tiny-en", "en", pairs=[("a", "a red square", np.zeros((8, 8, 3), np.uint8))])
    >>> [pair.caption for pair in spec.iter_pairs()]
    ['a red square']
    """

    name: str
    language: str
    pairs: Any
    description: str = ""
    source: str = ""
    licence: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise ValueError(
                f"collection name {self.name!r} is not valid: use 1 to 64 lowercase letters, digits, '.', "
                "'_' or '-', starting with a letter or digit (e.g. 'films-it')"
            )
        if not isinstance(self.language, str) or not self.language:
            raise ValueError(f"collection {self.name!r}: language must be a code such as 'it' or 'en'")
        if not callable(self.pairs) and not hasattr(self.pairs, "__iter__"):
            raise TypeError(
                f"collection {self.name!r}: pairs must be a function returning pairs or a re-iterable "
                f"object, got {type(self.pairs).__name__}"
            )
        if not callable(self.pairs) and iter(self.pairs) is self.pairs:
            # A generator would be exhausted after the first load and silently yield nothing after that.
            raise TypeError(
                f"collection {self.name!r}: pairs is a one-shot iterator; pass the function that creates "
                "it instead (pairs=my_generator_function)"
            )

    def details(self):
        """The spec's descriptive fields as a dict (what `collections info` prints)."""
        return {
            "name": self.name,
            "language": self.language,
            "description": self.description,
            "source": self.source,
            "licence": self.licence,
        }

    def iter_pairs(self):
        """Yields the spec's pairs as validated `RawPair`s; a malformed pair is a clear error naming it."""
        items = self.pairs() if callable(self.pairs) else self.pairs
        for index, item in enumerate(items):
            yield as_raw_pair(item, f"collection {self.name!r}, pair {index}")


def as_raw_pair(item, where):
    """Validates one pair (a RawPair, a tuple or a dict) and returns it as a `RawPair`; `where` names it in errors."""
    if isinstance(item, dict):
        unknown = set(item) - set(RawPair._fields)
        if unknown or not {"id", "caption", "image"} <= set(item):
            raise ValueError(
                f"{where}: a dict pair needs the keys id, caption, image (and optionally metadata), got "
                f"{sorted(item)}"
            )
        item = RawPair(**item)
    elif isinstance(item, (tuple, list)) and len(item) in (3, 4):
        item = RawPair(*item)
    else:
        raise TypeError(f"{where}: expected a RawPair or an (id, caption, image[, metadata]) tuple, got {item!r:.80}")
    pair_id, caption, image, metadata = item
    if not isinstance(pair_id, str) or not pair_id:
        raise ValueError(f"{where}: id must be a non-empty string, got {pair_id!r}")
    where = f"{where} (id {pair_id!r})"
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where}: caption must be a non-empty string, got {caption!r:.80}")
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if isinstance(image, str):
        if not image:
            raise ValueError(f"{where}: the image reference is empty; give a path or an fsspec URI")
    elif isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or image.size == 0 or not np.issubdtype(image.dtype, np.number):
            raise ValueError(
                f"{where}: an image array must be numeric (H, W) or (H, W, C) pixels, got shape "
                f"{image.shape} and dtype {image.dtype}"
            )
    else:
        raise TypeError(
            f"{where}: image must be a path, an fsspec URI or a pixel array, got {type(image).__name__}"
        )
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise TypeError(f"{where}: metadata must be a dict or None, got {type(metadata).__name__}")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: metadata must hold JSON values only (strings, numbers, lists, dicts): {error}") from None
    return RawPair(pair_id, caption, image, metadata)
