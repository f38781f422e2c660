"""keras-clip-it plugin: film posters and plots by country, one collection per country.

A manifest (CSV, JSON rows, or a Wikidata SPARQL JSON export) lists films with title, year, country,
poster and plot; every country in it becomes a collection ("films-it", "films-fr", ...), so a user
swaps one country's cinema for another's in an ASIF model with `asif.use("films-fr")`. The manifest is
found through $KERAS_CLIP_IT_FILMS_MANIFEST (a path or an fsspec URI); see the README for a Wikidata query.
"""

import os

import keras_clip_it
from keras_clip_it.collections import CollectionSpec

from keras_clip_it_films.manifest import Film  # noqa: F401
from keras_clip_it_films.manifest import film_pairs
from keras_clip_it_films.manifest import read_manifest

MANIFEST_ENV = "KERAS_CLIP_IT_FILMS_MANIFEST"


@keras_clip_it.hookimpl
def register_collections(register):
    location = os.environ.get(MANIFEST_ENV)
    if not location:
        return
    by_country = {}
    for film in read_manifest(location):
        by_country.setdefault(film.country, []).append(film)
    for country, films in sorted(by_country.items()):
        languages = {film.language for film in films}
        register(
            CollectionSpec(
                name=f"films-{country}",
                language=languages.pop() if len(languages) == 1 else "mul",
                pairs=lambda films=films: film_pairs(films),
                description=f"{len(films)} films from country {country.upper()}: posters with title, year and plot",
                source=location,
                licence="as the manifest's source says (Wikidata text is CC0; posters keep their own licences)",
            )
        )
