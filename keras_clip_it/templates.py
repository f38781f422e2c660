"""Prompt templates for zero-shot classification, in English and Italian.

A label alone ("cat") is a poor caption: captions in the wild say "a photo of a cat". Templates turn a
label into captions that look like the data the text side was built from, and averaging over several
templates smooths the wording away (Radford et al. 2021, section 3.1.4).

English: the 80 ImageNet templates of the CLIP paper ("en") and the 7 its authors kept after selection
("en-short"). Italian ("it", "it-short"): translations that need no article or agreement of their own,
since Italian articles and adjectives depend on the label's gender and number ("un gatto", "una mucca",
"gli orsi"). Every Italian template puts the label after a preposition ("una foto di {}.") or at the
start ("{} in un videogioco."), so a bare label reads right ("una foto di gatto") and so does one with
its own article, the preposition joining a definite article as Italian requires ("di" + "gli orsi" ->
"degli orsi", "a forma di" + "il gatto" -> "a forma del gatto").
"""

import re

import numpy as np

# Articulated prepositions: preposition + definite article -> one word ("di" + "il" = "del").
_PREPOSITIONS = {"di": "de", "a": "a", "da": "da", "in": "ne", "su": "su"}
_ARTICLES = {"il": "l", "lo": "llo", "la": "lla", "i": "i", "gli": "gli", "le": "lle", "l'": "ll'", "l’": "ll'"}
_JOINED = re.compile(r"\b(di|a|da|in|su) (il|lo|la|i|gli|le)\b(?=\s)|\b(di|a|da|in|su) (l'|l’)", re.IGNORECASE)


def contract(text):
    """Italian `text` with each preposition + definite article joined ("una foto di gli orsi" ->
    "una foto degli orsi", "di l'orso" -> "dell'orso").

    Example:
    >>> contract("un origami di lo scoiattolo")
    'un origami dello scoiattolo'
    """

    def join(match):
        preposition = (match.group(1) or match.group(3)).lower()
        article = (match.group(2) or match.group(4)).lower()
        return _PREPOSITIONS[preposition] + _ARTICLES[article]

    return _JOINED.sub(join, text)


class ItalianTemplate(str):
    """An Italian template string: `format` joins the preposition before the label with the label's
    definite article, if it has one ("una foto di {}." with "gli orsi" -> "una foto degli orsi.")."""

    def format(self, *args, **kwargs):
        return contract(str.format(self, *args, **kwargs))

ENGLISH = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

ENGLISH_SHORT = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# The English set's ideas in forms that hold for any gender and number ("una foto sfocata di {}" rather
# than "una foto di un {} sfocato"), the label always after a preposition or first, never a bare direct
# object ("ho fotografato gatto." is wrong): "itap" (I took a picture) becomes "una mia foto di".
ITALIAN = (
    "una foto di {}.",
    "una brutta foto di {}.",
    "una bella foto di {}.",
    "una foto sfocata di {}.",
    "una foto nitida di {}.",
    "una foto scura di {}.",
    "una foto luminosa di {}.",
    "una foto in bianco e nero di {}.",
    "una foto ritagliata di {}.",
    "una foto a bassa risoluzione di {}.",
    "una foto pixelata di {}.",
    "una foto sgranata di {}.",
    "una foto in primo piano di {}.",
    "una foto da vicino di {}.",
    "una foto difficile da vedere di {}.",
    "una foto ravvicinata di {}.",
    "una fotografia di {}.",
    "un'immagine di {}.",
    "un disegno di {}.",
    "uno schizzo di {}.",
    "uno scarabocchio di {}.",
    "un dipinto di {}.",
    "un quadro di {}.",
    "un'illustrazione di {}.",
    "un fumetto di {}.",
    "un cartone animato di {}.",
    "un rendering di {}.",
    "una scultura di {}.",
    "un tatuaggio di {}.",
    "un graffito di {}.",
    "un ricamo di {}.",
    "un origami di {}.",
    "un peluche a forma di {}.",
    "un giocattolo a forma di {}.",
    "una versione di plastica di {}.",
    "un'opera d'arte di {}.",
    "{} in un videogioco.",
    "{} in un cartone animato.",
    "una mia foto di {}.",
    "ecco una foto di {}.",
)

ITALIAN_SHORT = (
    "una foto di {}.",
    "una mia foto di {}.",
    "una brutta foto di {}.",
    "un origami di {}.",
    "{} in un videogioco.",
    "un disegno di {}.",
    "una foto in primo piano di {}.",
)

ITALIAN = tuple(ItalianTemplate(template) for template in ITALIAN)
ITALIAN_SHORT = tuple(ItalianTemplate(template) for template in ITALIAN_SHORT)

TEMPLATE_SETS = {"en": ENGLISH, "en-short": ENGLISH_SHORT, "it": ITALIAN, "it-short": ITALIAN_SHORT}


def get_templates(templates):
    """Resolves `templates` to a tuple of templates.

    Args:
        templates: a set name ("en", "en-short", "it", "it-short"), a single template string with "{}",
            a callable label -> caption, a list of those, or None (the label itself is the caption).

    Returns:
        A tuple of str templates and callables.

    Example:
    >>> get_templates("it-short")[0]
    'una foto di {}.'
    """
    if templates is None:
        return ("{}",)
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return TEMPLATE_SETS[templates]
        templates = [templates]
    elif callable(templates):
        templates = [templates]
    templates = tuple(templates)
    if not templates:
        raise ValueError("templates is empty: pass None to use the labels as captions")
    for template in templates:
        if isinstance(template, str):
            if "{}" not in template:
                known = ", ".join(repr(name) for name in TEMPLATE_SETS)
                raise ValueError(f"template {template!r} has no '{{}}' for the label (or name a set: {known})")
        elif not callable(template):
            raise TypeError(f"a template is a str with '{{}}' or a callable, got {type(template).__name__}")
    return templates


def fill(templates, label):
    """The captions of `label` under each template of `get_templates(templates)`."""
    return [t.format(label) if isinstance(t, str) else str(t(label)) for t in get_templates(templates)]


def prompt_embeddings(embed, labels, templates=None):
    """Unit (C, T, D) embeddings of each label's caption under each of the T templates.

    The one place labels become embeddings: `ensemble` averages them (CLIP's prompt ensembling), ASIF
    represents each prompt and pools the scores (the ASIF authors' way), the server and the SavedModel
    export go through one of the two.

    Args:
        embed: texts -> (n, D) unit embeddings (a text encoder's `embed`, a DualEncoder's `encode_texts`).
        labels: list of str class names.
        templates: as in `get_templates`.
    """
    captions = [fill(templates, label) for label in labels]
    per_label = len(captions[0])
    flat = np.asarray(embed([caption for group in captions for caption in group]), np.float32)
    return flat.reshape(len(labels), per_label, -1)


def ensemble(embed, labels, templates=None):
    """Unit (C, D) label embeddings: each label's captions under every template embedded, averaged and
    re-normalised (CLIP's prompt ensembling).

    Args:
        embed: texts -> (n, D) unit embeddings (a text encoder's `embed`, a DualEncoder's `encode_texts`).
        labels: list of str class names.
        templates: as in `get_templates`.

    Example:
    >>> ensemble(lambda texts: np.eye(2)[[len(t) % 2 for t in texts]], ["ab", "b"], None).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    return average(prompt_embeddings(embed, labels, templates))


def average(prompts):
    """(C, D) unit means of (C, T, D) prompt embeddings."""
    mean = np.asarray(prompts, np.float32).mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
