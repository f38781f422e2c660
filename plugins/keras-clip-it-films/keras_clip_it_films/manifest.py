"""Reading a films manifest: CSV, JSON rows or a Wikidata SPARQL JSON export, checked row by row."""

import csv
import io
import json
import os
import re
import warnings
from typing import NamedTuple

from keras_clip_it.collections import RawPair

REQUIRED = ("title", "country", "poster")
OPTIONAL = ("id", "year", "plot", "language")


class Film(NamedTuple):
    """One manifest row, normalised.

    Args:
        id: str, the Wikidata id ("Q18407") when the row has an entity URI, else a slug of country,
            title and year.
        title: str.
        year: int or None.
        country: str, ISO 3166-1 alpha-2 code, lowercase ("it").
        poster: str, path or URI of the poster image (relative ones resolved against the manifest).
        plot: str, may be "".
        language: str, language of title and plot ("en" when the manifest does not say).
    """

    id: str
    title: str
    year: int | None
    country: str
    poster: str
    plot: str
    language: str


def read_manifest(location):
    """The films of a manifest at a local path or fsspec URI; bad rows are errors naming the row.

    Rows without a poster are skipped with one warning (Wikidata has many films with no poster), and a
    film listed twice for the same country (one row per poster or per date in SPARQL results) is kept
    once, from its first row.

    Args:
        location: str, a .csv file with a header row, a .json file holding a list of objects, or a
            SPARQL JSON result ({"head": ..., "results": {"bindings": [...]}}).

    Returns:
        A list of `Film`, in manifest order.
    """
    rows = _rows(_read_text(location), location)
    films, seen, without_poster = [], set(), []
    for number, row in enumerate(rows, start=1):
        film = _film(row, f"manifest {location!r}, row {number}", location)
        if film is None:
            without_poster.append(row.get("title") or f"row {number}")
        elif (film.id, film.country) not in seen:
            seen.add((film.id, film.country))
            films.append(film)
    if without_poster:
        warnings.warn(
            f"manifest {location!r}: {len(without_poster)} films without a poster skipped "
            f"({', '.join(map(repr, without_poster[:5]))}{', ...' if len(without_poster) > 5 else ''})"
        )
    return films


def film_pairs(films):
    """Yields one pair per film: the poster, captioned with title, year and plot.

    Example:
    >>> film = Film("Q18407", "La dolce vita", 1960, "it", "p.png", "Un giornalista a Roma.", "it")
    >>> next(iter(film_pairs([film]))).caption
    'La dolce vita (1960). Un giornalista a Roma.'
    """
    for film in films:
        caption = film.title + (f" ({film.year})" if film.year else "") + (f". {film.plot}" if film.plot else "")
        metadata = {"title": film.title, "year": film.year, "country": film.country, "poster": film.poster}
        yield RawPair(film.id, caption, film.poster, metadata)


def _read_text(location):
    try:
        if "://" in location:
            import fsspec

            with fsspec.open(location, "rt", encoding="utf-8") as handle:
                return handle.read()
        with open(location, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(
            f"films manifest {location!r} could not be read ({type(error).__name__}: {error}); check "
            "$KERAS_CLIP_IT_FILMS_MANIFEST"
        ) from None


def _rows(text, location):
    if location.lower().endswith(".json") or text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"films manifest {location!r} is not valid JSON ({error})") from None
        if isinstance(data, dict) and isinstance(data.get("results"), dict):
            # SPARQL 1.1 JSON results: each binding maps a variable to {"type": ..., "value": ...}.
            data = [{name: cell.get("value", "") for name, cell in binding.items()} for binding in data["results"].get("bindings", [])]
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise ValueError(
                f"films manifest {location!r}: expected a JSON list of objects or a SPARQL JSON result"
            )
        rows = data
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    if rows:
        missing = [name for name in REQUIRED if name not in rows[0]]
        if missing:
            raise ValueError(
                f"films manifest {location!r} has no column {missing}; its columns are {sorted(rows[0])}, "
                f"expected {list(REQUIRED)} and optionally {list(OPTIONAL)}"
            )
    return rows


def _film(row, where, location):
    title = str(row.get("title") or "").strip()
    if not title:
        raise ValueError(f"{where}: the title is empty")
    country = str(row.get("country") or "").strip().lower()
    if not re.fullmatch(r"[a-z]{2}", country):
        raise ValueError(
            f"{where} ({title!r}): country must be an ISO 3166-1 alpha-2 code such as IT or FR (Wikidata "
            f"property P297), got {row.get('country')!r}"
        )
    poster = str(row.get("poster") or "").strip()
    if not poster:
        return None
    year = None
    if str(row.get("year") or "").strip():
        match = re.match(r"\s*(\d{4})", str(row["year"]))
        if not match:
            raise ValueError(f"{where} ({title!r}): year must start with four digits, got {row['year']!r}")
        year = int(match.group(1))
    film_id = str(row.get("id") or "").strip()
    if film_id.startswith("http"):
        film_id = film_id.rstrip("/").rsplit("/", 1)[-1]  # a Wikidata entity URI -> "Q18407"
    film_id = film_id or re.sub(r"[^a-z0-9]+", "-", f"{country} {title} {year or ''}".lower()).strip("-")
    if "://" not in poster and not os.path.isabs(poster):
        base = location.rsplit("/", 1)[0] if "://" in location else os.path.dirname(os.path.abspath(location))
        poster = f"{base}/{poster}" if "://" in location else os.path.join(base, poster)
    return Film(
        id=film_id,
        title=title,
        year=year,
        country=country,
        poster=poster,
        plot=" ".join(str(row.get("plot") or "").split()),
        language=str(row.get("language") or "en").strip().lower(),
    )
