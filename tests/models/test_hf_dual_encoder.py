"""A Hugging Face CLIP folder becomes a DualEncoder whose normalised embeddings and logits equal transformers'."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import keras_clip_it as kci  # noqa: E402
from tests.encoders.test_hf_clip import TEXTS  # noqa: E402
from tests.encoders.test_hf_clip import hf_pixel_values  # noqa: E402
from tests.encoders.test_hf_clip import pixels  # noqa: E402
from tests.encoders.test_hf_clip import tiny_vision_config  # noqa: E402
from tests.encoders.test_hf_clip import write_clip_tokenizer  # noqa: E402


def _normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.slow
def test_clip_folder_as_dual_encoder(tmp_path):
    vocab = write_clip_tokenizer(tmp_path)
    end = vocab["<|endoftext|>"]
    text_config = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16, bos_token_id=end - 1, eos_token_id=end,
                       pad_token_id=end)
    config = transformers.CLIPConfig(text_config=text_config, vision_config=tiny_vision_config("quick_gelu", 1e-5),
                                     projection_dim=10, logit_scale_init_value=3.0)
    torch.manual_seed(5)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(tmp_path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)

    ours = kci.DualEncoder.from_preset(str(tmp_path))
    assert ours.projection_dim == 10
    images = pixels(seed=6)
    tokens = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))(
        TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=hf_pixel_values(ours.image_encoder, images))
    image_embeddings = ours.encode_images(images)
    text_embeddings = ours.encode_texts(TEXTS)
    np.testing.assert_allclose(image_embeddings, _normalise(out.image_embeds.numpy()), atol=1e-4)
    np.testing.assert_allclose(text_embeddings, _normalise(out.text_embeds.numpy()), atol=1e-4)
    logits = float(ours.logit_scale) * image_embeddings @ text_embeddings.T
    np.testing.assert_allclose(logits, out.logits_per_image.numpy(), atol=1e-3)


def test_unknown_dual_encoder_folders_are_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "blip"}')
    with pytest.raises(ValueError, match="model_type 'blip'"):
        kci.DualEncoder.from_preset(str(tmp_path))
