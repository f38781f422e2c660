"""Hugging Face CLIP / VisionTextDualEncoder checkpoints loaded by us equal transformers' own forward pass.

The checkpoints are tiny random models built and saved with save_pretrained inside the tests (offline),
with activations, epsilons, sizes and projection dims varied so nothing is silently assumed.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from keras_clip_it.encoders.clip.clip_converter import load_clip_vision_model  # noqa: E402
from keras_clip_it.encoders.clip.clip_converter import load_dual_encoder_checkpoint  # noqa: E402
from keras_clip_it.encoders.formats.hf_weights import CheckpointError  # noqa: E402
from tests.helpers import assert_keras_roundtrip  # noqa: E402

WORDS = ["a", "photo", "of", "cat", "dog", "the", "gatto", "cane", "una", "foto", "di", "un"]
TEXTS = ["a photo of a cat", "The DOG", "una foto di un gatto", "cane", "dog cat dog cat the photo of a dog"]


def _bytes_to_unicode():
    """CLIP's byte-to-printable-character table (GPT-2's), rebuilt so the test depends on no tokenizer internals."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_clip_tokenizer(directory):
    """A small but real byte-level BPE vocabulary: every byte, whole-word merges for WORDS, specials."""
    symbols = _bytes_to_unicode()
    vocab = {}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    merges = list(dict.fromkeys(merges))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab


def tiny_vision_config(act, eps, **extra):
    return dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=2, hidden_act=act, layer_norm_eps=eps, **extra)


def pixels(seed=0, count=3):
    return np.random.RandomState(seed).randint(0, 256, (count, 32, 32, 3)).astype(np.uint8)


def hf_pixel_values(encoder, images):
    """What CLIPImageProcessor gives for images already at the model size: rescale and normalise."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.array(encoder.mean, np.float32)) / np.array(encoder.std, np.float32)
    return torch.tensor(x.transpose(0, 3, 1, 2))


@pytest.fixture(params=[("quick_gelu", 1e-5, 8), ("gelu", 1e-3, 12)], ids=["quick_gelu", "gelu-eps1e-3"])
def clip_folder(request, tmp_path):
    act, eps, projection_dim = request.param
    vocab = write_clip_tokenizer(tmp_path)
    text_config = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=20, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, hidden_act=act, layer_norm_eps=eps,
                       bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    config = transformers.CLIPConfig(text_config=text_config, vision_config=tiny_vision_config(act, eps),
                                     projection_dim=projection_dim)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(tmp_path)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    return tmp_path, model


@pytest.mark.slow
def test_clip_checkpoint_equals_transformers(clip_folder):
    folder, model = clip_folder
    parts = load_dual_encoder_checkpoint(str(folder))
    images = pixels()
    with torch.no_grad():
        vision = model.vision_model(pixel_values=hf_pixel_values(parts.image_encoder, images)).pooler_output
        want_images = model.visual_projection(vision).numpy()
    got_pooled = np.asarray(parts.image_encoder(images))
    np.testing.assert_allclose(got_pooled, vision.numpy(), atol=1e-4)
    np.testing.assert_allclose(got_pooled @ parts.image_projection, want_images, atol=1e-4)

    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    hf_tokens = tokenizer(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="np")
    ours = parts.text_encoder.tokenize(TEXTS)
    for row, text in enumerate(TEXTS):
        real = hf_tokens["attention_mask"][row].astype(bool)
        np.testing.assert_array_equal(ours["token_ids"][row][ours["padding_mask"][row].astype(bool)],
                                      hf_tokens["input_ids"][row][real], err_msg=text)
    with torch.no_grad():
        text = model.text_model(input_ids=torch.tensor(hf_tokens["input_ids"]),
                                attention_mask=torch.tensor(hf_tokens["attention_mask"])).pooler_output
        want_texts = model.text_projection(text).numpy()
    got_text = np.asarray(parts.text_encoder(ours))
    np.testing.assert_allclose(got_text, text.numpy(), atol=1e-4)
    np.testing.assert_allclose(got_text @ parts.text_projection, want_texts, atol=1e-4)
    assert parts.logit_scale == pytest.approx(float(model.logit_scale))
    assert parts.projection_dim == model.config.projection_dim
    assert_keras_roundtrip(parts.text_encoder, lambda m: m.embed(TEXTS), folder / "saved", atol=1e-6)


def write_bert_vocab(directory):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["caffe", "##e", "citta", "perche"]
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 24}))
    return tokens


@pytest.mark.slow
def test_vision_text_dual_encoder_checkpoint_equals_transformers(tmp_path):
    tokens = write_bert_vocab(tmp_path)
    vision = transformers.CLIPVisionConfig(**tiny_vision_config("gelu", 1e-5))
    bert = transformers.BertConfig(vocab_size=len(tokens), hidden_size=16, intermediate_size=20, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=32, hidden_act="gelu")
    config = transformers.VisionTextDualEncoderConfig.from_vision_text_configs(vision, bert, projection_dim=6)
    torch.manual_seed(1)
    model = transformers.VisionTextDualEncoderModel(config).eval()
    model.save_pretrained(tmp_path)
    parts = load_dual_encoder_checkpoint(str(tmp_path))

    images = pixels(seed=2)
    with torch.no_grad():
        want = model.get_image_features(pixel_values=hf_pixel_values(parts.image_encoder, images))
    want = getattr(want, "pooler_output", want).numpy()
    np.testing.assert_allclose(np.asarray(parts.image_encoder(images)) @ parts.image_projection, want, atol=1e-4)

    texts = ["Una foto di un gatto", "caffè città perché", "cane"]  # accents stripped as BertTokenizer does
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=True)
    hf_tokens = tokenizer(texts, padding="max_length", max_length=24, truncation=True, return_tensors="np")
    ours = parts.text_encoder.tokenize(texts)
    np.testing.assert_array_equal(ours["token_ids"], hf_tokens["input_ids"])
    with torch.no_grad():
        want = model.get_text_features(input_ids=torch.tensor(hf_tokens["input_ids"]),
                                       attention_mask=torch.tensor(hf_tokens["attention_mask"]),
                                       token_type_ids=torch.tensor(hf_tokens["token_type_ids"]))
    want = getattr(want, "pooler_output", want).numpy()
    np.testing.assert_allclose(np.asarray(parts.text_encoder(ours)) @ parts.text_projection, want, atol=1e-4)


@pytest.mark.slow
def test_clip_vision_model_alone_and_keras_roundtrip(tmp_path):
    config = transformers.CLIPVisionConfig(**tiny_vision_config("quick_gelu", 1e-5))
    torch.manual_seed(3)
    model = transformers.CLIPVisionModel(config).eval()
    model.save_pretrained(tmp_path)
    import keras_clip_it as kci

    encoder = kci.ImageEncoder.from_preset(str(tmp_path))
    images = pixels(seed=4)
    with torch.no_grad():
        want = model(pixel_values=hf_pixel_values(encoder, images)).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(encoder(images)), want, atol=1e-4)
    assert_keras_roundtrip(encoder, lambda m: np.asarray(m(images)), tmp_path / "saved", atol=1e-6)


def test_bad_checkpoints_name_the_tensor_and_file(tmp_path):
    from safetensors.numpy import save_file

    config = tiny_vision_config("quick_gelu", 1e-5)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", **config}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_clip_vision_model(str(tmp_path))
    save_file({"vision_model.embeddings.class_embedding": np.zeros(16, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="patch_embedding.weight' is missing from .*model.safetensors"):
        load_clip_vision_model(str(tmp_path))
    save_file({"vision_model.embeddings.class_embedding": np.zeros(16, np.float32),
               "vision_model.embeddings.patch_embedding.weight": np.zeros((16, 3, 4, 4), np.float32)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"patch_embedding.weight' .* has shape \(16, 3, 4, 4\)"):
        load_clip_vision_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_clip_vision_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", **config, "hidden_act": "swish"}))
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "flax_model.msgpack").write_bytes(b"")
    with pytest.raises(CheckpointError, match="from_flax=True"):
        load_clip_vision_model(str(tmp_path))
