"""Saved towers load in a new process that names only `kci.ImageEncoder` or `kci.TextEncoder`.

The backbones and tokenizers of the architecture folders are Keras classes that Keras finds by their
registered names only once their modules are imported; the towers import them when rebuilt, so a user
(or a `keras-clip-it` command) needs to import no folder to load a `.keras` file.
"""

import json
import os
import subprocess
import sys

import keras
import keras_hub
import numpy as np

import keras_clip_it as kci
from keras_clip_it.encoders.clip.clip_towers import CLIPVisionTower
from keras_clip_it.encoders.minilm.hf_bert_backbone import HFBertBackbone
from keras_clip_it.encoders.minilm.hf_bert_tokenizer import HFBertTokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "gatto", "cane", "!"]
TEXTS = ["un gatto!", "un cane"]
LOAD = """
import json, sys
import keras
import numpy as np
import keras_clip_it as kci

kci.ImageEncoder, kci.TextEncoder  # what a user names before loading, as the package docs say
image = keras.saving.load_model(sys.argv[1])
text = keras.saving.load_model(sys.argv[2])
pixels = np.random.RandomState(3).randint(0, 256, (2, 32, 32, 3)).astype("uint8")
print(json.dumps({"image": image.embed(pixels).tolist(), "text": text.embed(json.loads(sys.argv[3])).tolist(),
                  "classes": [type(image.backbone).__name__, type(text.backbone).__name__]}))
"""


def test_towers_with_folder_classes_load_in_a_new_process(tmp_path):
    keras.utils.set_random_seed(0)
    vision = CLIPVisionTower(8, 16, num_layers=1, num_heads=2, intermediate_dim=32, image_shape=(32, 32, 3))
    image = kci.ImageEncoder(vision, image_size=32, crop_pct=1.0, pooling="cls")
    bert = HFBertBackbone(vocabulary_size=len(VOCAB), num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16,
                          max_sequence_length=16, activation="gelu")
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(HFBertTokenizer(VOCAB), sequence_length=16)
    text = kci.TextEncoder(bert, preprocessor)
    image.save(tmp_path / "image.keras")
    text.save(tmp_path / "text.keras")

    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp_path / "image.keras"), str(tmp_path / "text.keras"), json.dumps(TEXTS)],
        capture_output=True, text=True, timeout=300, env=os.environ,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["classes"] == ["CLIPVisionTower", "HFBertBackbone"]
    pixels = np.random.RandomState(3).randint(0, 256, (2, 32, 32, 3)).astype("uint8")
    np.testing.assert_allclose(loaded["image"], image.embed(pixels), atol=1e-5)
    np.testing.assert_allclose(loaded["text"], text.embed(TEXTS), atol=1e-5)
