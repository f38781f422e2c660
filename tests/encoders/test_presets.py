"""The preset registry: filled by the architecture folders on import, lazily, and refusing clashes."""

import json
import os
import subprocess
import sys

import pytest

import keras_clip_it as kci
from keras_clip_it.encoders import presets


def test_the_folders_register_on_import_without_loading_keras_hub():
    code = (
        "import json, sys\n"
        "from keras_clip_it.encoders import presets\n"
        "print(json.dumps([presets.names('image'), presets.names('text'), sorted(presets._CONVERTERS['image']),"
        " sorted(presets._CONVERTERS['text']), 'keras_hub' in sys.modules]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ)
    assert result.returncode == 0, result.stderr[-3000:]
    image, text, image_types, text_types, keras_hub_loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert image == ["efficientnet_lite0_imagenet"]
    assert text == ["all_minilm_l6_v2", "multilingual_e5_small"]
    assert image_types == ["clip", "clip_vision_model"] and text_types == ["bert"]
    assert not keras_hub_loaded  # loaders are registered by path and imported on first use


def test_models_register_the_dual_converters():
    assert kci.DualEncoder  # importing keras_clip_it.models registers them
    assert presets.converter("dual", "clip") is presets.converter("dual", "vision-text-dual-encoder")


def toy_converter(directory, **kwargs):
    return ("toy", directory, kwargs)


def test_a_converter_registered_by_path_is_dispatched_by_model_type(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "_CONVERTERS", {kind: dict(types) for kind, types in presets._CONVERTERS.items()})
    presets.register_converter("text", "toy", f"{__name__}:toy_converter")
    presets.register_converter("text", "toy", f"{__name__}:toy_converter")  # the same again is harmless
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    assert kci.TextEncoder.from_preset(str(tmp_path), prefix="x") == ("toy", str(tmp_path), {"prefix": "x"})
    with pytest.raises(ValueError, match="'toy' already has a text converter"):
        presets.register_converter("text", "toy", toy_converter)
    with pytest.raises(ValueError, match=r"model_type 'toy', which ImageEncoder.from_preset cannot load yet; "
                                         r"supported: \['clip', 'clip_vision_model'\]"):
        kci.ImageEncoder.from_preset(str(tmp_path))
    with pytest.raises(ValueError, match="kind must be one of"):
        presets.register_converter("audio", "toy", toy_converter)


def test_preset_names_cannot_be_taken_twice(monkeypatch):
    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))
    with pytest.raises(ValueError, match="'all_minilm_l6_v2' is taken"):
        presets.register_preset(presets.Preset("all_minilm_l6_v2", "text", f"{__name__}:toy_converter", "another"))
    with pytest.raises(ValueError, match="presets are 'image' or 'text'"):
        presets.register_preset(presets.Preset("toy", "dual", f"{__name__}:toy_converter", "a dual encoder"))
