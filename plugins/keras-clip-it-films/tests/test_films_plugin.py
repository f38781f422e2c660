import os

import fsspec
import pytest

import keras_clip_it as kci
from keras_clip_it.data.images import load_images
from keras_clip_it_films import read_manifest


def test_csv_manifest_rows_are_normalised(fixture_path):
    with pytest.warns(UserWarning, match="1 films without a poster skipped .'Il sorpasso'"):
        films = read_manifest(fixture_path("films.csv"))
    assert [film.id for film in films] == [
        "it-la-dolce-vita-1960",
        "it-ladri-di-biciclette-1948",
        "it-8-1963",
        "fr-les-quatre-cents-coups-1959",
        "fr-le-fabuleux-destin-d-am-lie-poulain-2001",
        "de-metropolis-1927",
    ]
    dolce_vita = films[0]
    assert (dolce_vita.title, dolce_vita.year, dolce_vita.country, dolce_vita.language) == ("La dolce vita", 1960, "it", "it")
    assert dolce_vita.poster == fixture_path(os.path.join("posters", "dolce_vita.png"))
    assert films[-1].plot == "" and films[-1].language == "de"


def test_one_collection_per_country_from_the_installed_plugin(fixture_path, monkeypatch):
    assert not [name for name in kci.collections.available() if name.startswith("films-")]
    monkeypatch.setenv("KERAS_CLIP_IT_FILMS_MANIFEST", fixture_path("films.csv"))
    with pytest.warns(UserWarning, match="without a poster"):
        details = {d["name"]: d for d in kci.collections.available(details=True) if d["name"].startswith("films-")}
    assert sorted(details) == ["films-de", "films-fr", "films-it"]
    assert details["films-it"]["language"] == "it" and details["films-it"]["plugin"] == "films"
    with pytest.warns(UserWarning, match="without a poster"):
        italian = kci.collections.load("films-it")
        french = kci.collections.load("films-fr")
    assert italian.language == "it" and len(italian) == 3 and len(french) == 2
    assert italian.captions[0] == "La dolce vita (1960). Un giornalista vaga per Roma tra feste, nobili e dive."
    assert italian.metadata[1] == {
        "title": "Ladri di biciclette",
        "year": 1948,
        "country": "it",
        "poster": fixture_path(os.path.join("posters", "ladri_di_biciclette.png")),
    }
    assert load_images(french.image_refs).shape == (2, 30, 20, 3)


def test_wikidata_sparql_export(fixture_path):
    films = read_manifest(fixture_path("wikidata.json"))
    # La Dolce Vita has two release dates in Italy (two rows) and is also listed for France.
    assert [(film.id, film.country, film.year) for film in films] == [
        ("Q18407", "it", 1960),
        ("Q18407", "fr", 1960),
        ("Q15622", "de", 1927),
    ]
    assert films[0].language == "en" and films[2].plot == "1927 film by Fritz Lang"


def test_manifest_on_an_fsspec_filesystem(fixture_path):
    memory = fsspec.filesystem("memory")
    memory.put(fixture_path("films.csv"), "/films/films.csv")
    memory.put(fixture_path("posters"), "/films/posters", recursive=True)
    with pytest.warns(UserWarning, match="without a poster"):
        films = read_manifest("memory://films/films.csv")
    assert films[0].poster == "memory://films/posters/dolce_vita.png"
    assert load_images([film.poster for film in films]).shape == (6, 30, 20, 3)
    memory.rm("/films", recursive=True)


@pytest.mark.parametrize(
    "content, message",
    [
        ("title,year,country,poster\nRoma,1972,Italy,p.png\n", r"row 1 \('Roma'\): country must be an ISO 3166-1 alpha-2"),
        ("title,year,country,poster\nRoma,circa 1972,IT,p.png\n", "year must start with four digits"),
        ("name,year,country,poster\nRoma,1972,IT,p.png\n", r"has no column \['title'\]"),
        ('{"results": ', "is not valid JSON"),
        ('{"films": []}', "expected a JSON list of objects or a SPARQL JSON result"),
    ],
)
def test_bad_manifests_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "films.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_manifest(str(path))


def test_a_bad_manifest_breaks_only_this_plugin(tmp_path, monkeypatch):
    path = tmp_path / "films.csv"
    path.write_text("title,year,country,poster\nRoma,1972,Italy,p.png\n")
    monkeypatch.setenv("KERAS_CLIP_IT_FILMS_MANIFEST", str(path))
    with pytest.warns(UserWarning, match="plugin 'films' is broken"):
        names = kci.collections.available()
    assert "films" in kci.collections.broken() and not [name for name in names if name.startswith("films-")]
    with pytest.raises(LookupError, match="plugins that failed .* \\['films'\\]"):
        kci.collections.load("films-it")
