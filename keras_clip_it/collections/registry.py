"""Discovers collection plugins and turns their specs into analogy collections.

Plugins are installed packages with an entry point in the group "keras_clip_it" (as Datasette's and
llm's plugins are); each implements `register_collections(register)`. One broken plugin must not take
the others down, so every entry point is imported, and every hook called, on its own: a failure is
reported by plugin name (a warning, and `broken()`), and the remaining collections stay available.
"""

import hashlib
import importlib.metadata
import os
import threading
import urllib.parse
import warnings

import numpy as np
import pluggy

from keras_clip_it.collections import hookspecs
from keras_clip_it.collections import storage
from keras_clip_it.collections.analogy_collection import AnalogyCollection
from keras_clip_it.collections.specs import NAME_PATTERN
from keras_clip_it.collections.specs import CollectionSpec
from keras_clip_it.collections.specs import as_raw_pair

ENTRY_POINT_GROUP = "keras_clip_it"


class PluginWarning(UserWarning):
    """A plugin failed to import or to register its collections and was skipped."""


class CollectionNotFoundError(LookupError):
    """No installed plugin registers a collection of that name."""


class DuplicateCollectionError(ValueError):
    """Two plugins register a collection under the same name."""


class Registry:
    """A pluggy plugin manager for collection plugins, plus the reports of the plugins that failed.

    The package keeps one (`keras_clip_it.collections.registry.default`); a new instance re-reads the
    installed entry points, which tests use after putting a plugin on `sys.path`.

    Args:
        load_entry_points: bool, whether to import the plugins installed under the "keras_clip_it"
            entry-point group (on first use, not at construction).

    Example:
    >>> registry = Registry(load_entry_points=False)
    >>> class Tiny:
    ...     @hookspecs.hookimpl
    ...     def register_collections(self, register):
    ...         register(CollectionSpec("tiny-en", "en", pairs=[]))
    >>> _ = registry.pm.register(Tiny(), name="tiny")
    >>> registry.available()
    ['tiny-en']
    """

    def __init__(self, load_entry_points=True):
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self._load_entry_points = load_entry_points
        self._import_failures = {}
        self._lock = threading.Lock()

    def _import_plugins(self):
        with self._lock:
            if not self._load_entry_points:
                return
            self._load_entry_points = False
            by_name = {}
            for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                distribution = entry_point.dist.name if entry_point.dist else "?"
                by_name.setdefault(entry_point.name, []).append(distribution)
            for name, distributions in sorted(by_name.items()):
                if len(set(distributions)) > 1:
                    # pluggy would load the first and silently skip the other.
                    self._import_failures[name] = (
                        f"the entry point name {name!r} is used by several packages {sorted(set(distributions))}: "
                        "uninstall one of them"
                    )
                    continue
                try:
                    # One name at a time: pluggy stops at the first plugin that fails to import.
                    self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
                except Exception as error:  # a plugin may fail in any way; report it, keep the others
                    self._import_failures[name] = f"failed to import ({type(error).__name__}: {error})"

    def _collect(self, warn=True):
        """Runs every plugin's hook on its own; returns specs by name, owners by name and problems by plugin."""
        self._import_plugins()
        problems = {name: [reason] for name, reason in self._import_failures.items()}
        specs, owners = {}, {}
        for impl in self.pm.hook.register_collections.get_hookimpls():
            registered = []

            def register(spec, _registered=registered, _plugin=impl.plugin_name):
                if not isinstance(spec, CollectionSpec):
                    raise TypeError(
                        f"plugin {_plugin!r} called register() with {type(spec).__name__}; pass a "
                        "keras_clip_it.collections.CollectionSpec"
                    )
                _registered.append(spec)

            arguments = {"register": register}
            try:
                impl.function(**{name: arguments[name] for name in impl.argnames})
            except Exception as error:  # a plugin may fail in any way; report it, keep the others
                problems.setdefault(impl.plugin_name, []).append(
                    f"register_collections raised {type(error).__name__}: {error}"
                )
                continue
            for spec in registered:
                owners.setdefault(spec.name, []).append(impl.plugin_name)
                specs.setdefault(spec.name, spec)
        for name, plugins in owners.items():
            if len(plugins) > 1:
                del specs[name]
                for plugin in sorted(set(plugins)):
                    problems.setdefault(plugin, []).append(_duplicate_message(name, plugins))
        for plugin, reasons in problems.items() if warn else ():
            # Python's warning filters show each message once per calling line, not on every call.
            message = f"keras-clip-it plugin {plugin!r} is broken, the other plugins still work: {'; '.join(reasons)}"
            warnings.warn(message, PluginWarning, stacklevel=3)
        return specs, owners, {plugin: "; ".join(reasons) for plugin, reasons in problems.items()}

    def available(self, details=False):
        """Names of the collections registered by the plugins that work, sorted.

        Args:
            details: bool; if True, returns a list of dicts (name, language, description, source, licence,
                plugin) instead of names.

        Example:
        >>> kci.collections.available()  # doctest: +SKIP
        ['emoji-en', 'emoji-it', 'fashion-en', 'fashion-it', 'news-it']
        """
        specs, owners, _ = self._collect()
        if not details:
            return sorted(specs)
        return [dict(specs[name].details(), plugin=owners[name][0]) for name in sorted(specs)]

    def broken(self):
        """The plugins that failed, as {plugin name: what went wrong}; empty when all is well."""
        return self._collect(warn=False)[2]

    def details(self, name):
        """One registered collection's details, as `available(details=True)` lists them."""
        specs, owners, problems = self._collect()
        return dict(_pick(name, specs, owners, problems).details(), plugin=owners[name][0])

    def get_spec(self, name):
        """The `CollectionSpec` registered under `name`; unknown or duplicated names are clear errors."""
        return _pick(name, *self._collect())

    def load(self, name_or_uri):
        """An `AnalogyCollection` from a registered name ("emoji-it") or a stored one at an fsspec URI/path.

        A registered collection is built from its plugin's raw pairs, with no embeddings yet: the model
        that uses it embeds it with its own encoders (`col.embed(...)`). Pixel arrays a plugin yields are
        written once as PNG files under the cache folder, so every pair has an image reference that can
        be re-read, saved with the collection and embedded by any encoder later.

        Args:
            name_or_uri: str or os.PathLike: a registered name, or where `storage.save_collection` wrote one
                ("/data/films-it", "file:///...", "memory://...", "s3://...").

        Example:
        >>> col = kci.collections.load("emoji-it")  # doctest: +SKIP
        >>> col.embed(image_encoder=img, text_encoder=txt)  # doctest: +SKIP
        """
        if not isinstance(name_or_uri, (str, os.PathLike)):
            raise TypeError(f"load() takes a collection name or a URI, got {type(name_or_uri).__name__}")
        target = os.fspath(name_or_uri)
        is_name = NAME_PATTERN.match(target) and "://" not in target
        if is_name:
            specs, owners, problems = self._collect()
            if target in owners or not os.path.exists(target):
                return build_collection(_pick(target, specs, owners, problems))
        return storage.open_collection(target)


def _pick(name, specs, owners, problems):
    if len(owners.get(name, ())) > 1:
        raise DuplicateCollectionError(_duplicate_message(name, owners[name]))
    if name not in specs:
        message = f"no installed plugin registers a collection named {name!r}; available: {sorted(specs)}"
        if problems:
            message += f"; plugins that failed (their collections are missing): {sorted(problems)}"
        raise CollectionNotFoundError(message + ". Install the plugin package that provides it")
    return specs[name]


def _duplicate_message(name, plugins):
    if len(set(plugins)) == 1:
        return f"plugin {plugins[0]!r} registers the collection {name!r} more than once: give each a distinct name"
    return (
        f"collection {name!r} is registered by both plugins {' and '.join(repr(p) for p in sorted(plugins))}: "
        "uninstall one of them (pip uninstall ...) or ask its author to rename it"
    )


def build_collection(spec):
    """An in-memory `AnalogyCollection` holding `spec`'s pairs (ids, captions, image references, metadata)."""
    collection = AnalogyCollection(name=spec.name, language=spec.language)
    add_pairs(collection, spec.iter_pairs())
    return collection


def add_pairs(collection, pairs, image_encoder=None, text_encoder=None, batch_size=32):
    """Appends raw pairs to an in-memory collection, embedding them with the encoders it already uses.

    Args:
        collection: an `AnalogyCollection`.
        pairs: iterable of `RawPair` (or tuples, validated as `CollectionSpec` does).
        image_encoder: the encoder of the collection's image embeddings, if it has any.
        text_encoder: likewise for text.
        batch_size: images per encoder batch.

    Returns:
        The list of ids added.
    """
    columns = prepare_pairs(collection.name, collection.fingerprints, pairs, image_encoder, text_encoder, batch_size)
    if columns["ids"]:
        collection.add(**columns)
    return columns["ids"]


def prepare_pairs(name, fingerprints, pairs, image_encoder=None, text_encoder=None, batch_size=32):
    """The columns and embeddings that add raw pairs to a collection embedded with `fingerprints`.

    A collection never holds rows that one of its encoders has not embedded, so for every fingerprint
    it has, the matching encoder must be given; only the new pairs are embedded. Everything is computed
    before the caller changes the collection, so a failure leaves it as it was.

    Args:
        name: str, the collection's name, for messages (and the folder of cached pixel arrays).
        fingerprints: {"image": [...], "text": [...]}, the collection's encoders (`col.fingerprints`).
        pairs: iterable of `RawPair` (or tuples, validated as `CollectionSpec` does).
        image_encoder, text_encoder: the encoders of those fingerprints.
        batch_size: images per encoder batch.

    Returns:
        A dict with ids, captions, image_refs, metadata and embeddings, the arguments of
        `AnalogyCollection.add` and `storage.append`.
    """
    pairs = [as_raw_pair(pair, f"collection {name!r}, new pair {index}") for index, pair in enumerate(pairs)]
    image_refs = [
        _cache_image(name, pair.id, pair.image) if isinstance(pair.image, np.ndarray) else pair.image for pair in pairs
    ]
    captions = [pair.caption for pair in pairs]
    encoders = {"image": image_encoder, "text": text_encoder}
    embeddings = {}
    for kind, kind_fingerprints in fingerprints.items():
        for fingerprint in kind_fingerprints:
            encoder = encoders[kind]
            if encoder is None or encoder.fingerprint != fingerprint:
                raise ValueError(
                    f"collection {name!r} holds {kind} embeddings from encoder {fingerprint[:12]}: pass "
                    f"{kind}_encoder= with that fingerprint so the new pairs are embedded the same way"
                )
            if pairs and kind == "image":
                embeddings.setdefault(kind, {})[fingerprint] = encoder.embed(image_refs, batch_size=batch_size)
            elif pairs:
                embeddings.setdefault(kind, {})[fingerprint] = encoder.embed(captions)
    return {
        "ids": [pair.id for pair in pairs],
        "captions": captions,
        "image_refs": image_refs,
        "metadata": [pair.metadata for pair in pairs],
        "embeddings": embeddings or None,
    }


def _cache_image(collection_name, pair_id, pixels):
    """Writes a pixel array once as PNG under the cache folder and returns its path.

    The file name carries a digest of the pixels, so a plugin that changes an image gets a new file
    instead of a stale one; the write goes through a temporary file so a crash never leaves a torn PNG.
    """
    from PIL import Image

    from keras_clip_it.data.images import to_rgb_array
    from keras_clip_it.cache import cache_dir

    rgb = to_rgb_array(pixels)
    digest = hashlib.sha1(rgb.tobytes() + repr(rgb.shape).encode()).hexdigest()[:12]
    folder = os.path.join(cache_dir(), "collections", collection_name, "images")
    path = os.path.join(folder, f"{urllib.parse.quote(pair_id, safe='')[:100]}-{digest}.png")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        Image.fromarray(rgb).save(temporary, format="PNG")
        os.replace(temporary, path)
    return path


default = Registry()
pm = default.pm
available = default.available
broken = default.broken
details = default.details
get_spec = default.get_spec
load = default.load
