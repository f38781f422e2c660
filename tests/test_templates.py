"""Italian templates read right for bare labels and for labels with their own article."""

import pytest

from keras_clip_it.templates import ITALIAN
from keras_clip_it.templates import ITALIAN_SHORT
from keras_clip_it.templates import contract
from keras_clip_it.templates import fill
from keras_clip_it.templates import get_templates

CASES = [
    # (template, label, caption)
    ("una foto di {}.", "gatto", "una foto di gatto."),
    ("una foto di {}.", "un gatto", "una foto di un gatto."),
    ("una foto di {}.", "una mucca", "una foto di una mucca."),
    ("una foto di {}.", "il gatto", "una foto del gatto."),
    ("una foto di {}.", "lo scoiattolo", "una foto dello scoiattolo."),
    ("una foto di {}.", "la mucca", "una foto della mucca."),
    ("una foto di {}.", "l'orso", "una foto dell'orso."),
    ("una foto di {}.", "i cani", "una foto dei cani."),
    ("una foto di {}.", "gli orsi", "una foto degli orsi."),
    ("una foto di {}.", "le mucche", "una foto delle mucche."),
    ("una foto di {}.", "Il gatto", "una foto del gatto."),
    ("una mia foto di {}.", "gatto", "una mia foto di gatto."),
    ("ecco una foto di {}.", "gli orsi", "ecco una foto degli orsi."),
    ("un peluche a forma di {}.", "l\u2019orso", "un peluche a forma dell'orso."),
    ("{} in un videogioco.", "gli orsi", "gli orsi in un videogioco."),
    ("{} in un videogioco.", "gatto", "gatto in un videogioco."),
    # A preposition inside the label is joined too; words that only start like an article are not.
    ("una foto di {}.", "scarpa da lo sport", "una foto di scarpa dallo sport."),
    ("una foto di {}.", "isole", "una foto di isole."),
    ("una foto di {}.", "lupo", "una foto di lupo."),
]


@pytest.mark.parametrize("template, label, caption", CASES)
def test_italian_captions_are_grammatical(template, label, caption):
    assert template in ITALIAN
    assert fill([ITALIAN[ITALIAN.index(template)]], label) == [caption]


@pytest.mark.parametrize("preposition, joined", [("di", "del"), ("a", "al"), ("da", "dal"), ("in", "nel"), ("su", "sul")])
def test_every_articulated_preposition(preposition, joined):
    assert contract(f"{preposition} il mare") == f"{joined} mare"
    assert contract(f"{preposition} gli orsi") == joined[:-1] + "gli orsi"


def test_no_italian_template_takes_a_bare_direct_object():
    # "ho fotografato gatto." and "ecco gatto." are wrong: the label must follow a preposition or lead.
    for template in ITALIAN + ITALIAN_SHORT:
        before = template.split("{}")[0].split()
        assert not before or before[-1] in ("di",), template


def test_english_templates_are_left_as_they_are():
    assert fill("en-short", "the dog")[0] == "itap of a the dog."
    assert get_templates("it-short")[0] == "una foto di {}."
