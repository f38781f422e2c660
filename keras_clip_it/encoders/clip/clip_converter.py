"""Hugging Face CLIP and VisionTextDualEncoder (CLIP-Italian) checkpoints loaded into kci's CLIP towers.

keras-hub has no converter from Hugging Face's CLIP format; this one builds `CLIPVisionTower` and
`CLIPTextTower` (`clip_towers`) from the checkpoint's config and ports its tensors.

Supported `model_type`s:
- "clip" (openai/clip-vit-*, laion CLIP in HF format): both towers, projections, logit scale, the BPE
  tokenizer and the image preprocessing of preprocessor_config.json;
- "vision-text-dual-encoder" (clip-italian/clip-italian): a CLIP vision tower and a BERT text tower
  pooled by BERT's pooler, with their projections;
- "clip_vision_model" (an image tower alone), for `ImageEncoder.from_preset`.
"""

import os
from dataclasses import dataclass

import numpy as np

from keras_clip_it.encoders.clip.clip_towers import CLIPTextTower
from keras_clip_it.encoders.clip.clip_towers import CLIPVisionTower
from keras_clip_it.encoders.formats.hf_weights import CheckpointError
from keras_clip_it.encoders.formats.hf_weights import StateDictLoader
from keras_clip_it.encoders.formats.hf_weights import read_config
from keras_clip_it.encoders.formats.hf_weights import read_state_dict
from keras_clip_it.encoders.image_encoder import ImageEncoder
from keras_clip_it.encoders.text_encoder import TextEncoder
from keras_clip_it.encoders.text_preprocessor import TextPreprocessor

# Hugging Face activation names -> names CLIPEncoderLayer accepts (exact GELU is keras' default).
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "relu": "relu"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


@dataclass
class DualEncoderCheckpoint:
    """What a dual-encoder checkpoint holds, ready for `DualEncoder`: towers, projections, temperature."""

    image_encoder: ImageEncoder
    text_encoder: TextEncoder
    image_projection: np.ndarray  # (image embedding_dim, projection_dim), applied as x @ W
    text_projection: np.ndarray  # (text embedding_dim, projection_dim)
    logit_scale: float  # the log of the temperature multiplier, as stored by CLIP
    projection_dim: int


def _activation(config, path):
    name = config.get("hidden_act", "quick_gelu")
    if name not in ACTIVATIONS:
        raise CheckpointError(f"{path} uses hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _port_layer_norm(loader, layer, key):
    loader.port_weight(layer.gamma, f"{key}.weight")
    loader.port_weight(layer.beta, f"{key}.bias")


def _port_dense(loader, layer, key):
    loader.port_weight(layer.kernel, f"{key}.weight", hook_fn=lambda x, _: x.T)
    if layer.bias is not None:
        loader.port_weight(layer.bias, f"{key}.bias")


def _port_encoder_layers(loader, layers, prefix):
    for index, block in enumerate(layers):
        key = f"{prefix}.{index}.self_attn"
        # One (hidden, 3 * hidden) projection from Hugging Face's separate q, k, v (out, in) matrices.
        names = ("q_proj", "k_proj", "v_proj")
        kernels = [loader.get_tensor(f"{key}.{name}.weight").T for name in names]
        biases = [loader.get_tensor(f"{key}.{name}.bias") for name in names]
        _assign(block.qkv_dense.kernel, np.concatenate(kernels, axis=1), loader, f"{key}.q_proj.weight")
        _assign(block.qkv_dense.bias, np.concatenate(biases), loader, f"{key}.q_proj.bias")
        _port_dense(loader, block.output_dense, f"{key}.out_proj")
        key = f"{prefix}.{index}"
        _port_layer_norm(loader, block.layer_norm_1, f"{key}.layer_norm1")
        _port_layer_norm(loader, block.layer_norm_2, f"{key}.layer_norm2")
        _port_dense(loader, block.dense_1, f"{key}.mlp.fc1")
        _port_dense(loader, block.dense_2, f"{key}.mlp.fc2")


def _assign(variable, value, loader, key):
    if tuple(value.shape) != tuple(variable.shape):
        raise CheckpointError(
            f"tensor {loader.prefix + key!r} and its k/v companions in {loader.source} give shape "
            f"{tuple(value.shape)}, which does not fit the model built from the config ({tuple(variable.shape)})"
        )
    variable.assign(value.astype(variable.dtype))


def _image_preprocessing(directory, image_size):
    """Resizing and normalisation from preprocessor_config.json, CLIP's defaults when it is absent."""
    path = os.path.join(directory, "preprocessor_config.json")
    config = read_config(directory, "preprocessor_config.json") if os.path.exists(path) else {}
    size = config.get("size", image_size)
    shortest = size.get("shortest_edge", size.get("height", image_size)) if isinstance(size, dict) else size
    crop = config.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    if crop != image_size:
        raise CheckpointError(f"{path} crops to {crop} pixels but the vision tower takes {image_size}")
    return {
        "mean": config.get("image_mean", CLIP_MEAN),
        "std": config.get("image_std", CLIP_STD),
        "crop_pct": crop / shortest if config.get("do_center_crop", True) else 1.0,
        "resample": PIL_RESAMPLE.get(config.get("resample", 3), "bicubic"),
    }


def clip_vision_encoder(directory, vision_config, loader):
    """Builds the CLIP image tower of a checkpoint and ports its weights; pooled at the class token."""
    size = vision_config.get("image_size", 224)
    tower = CLIPVisionTower(
        patch_size=vision_config["patch_size"],
        hidden_dim=vision_config["hidden_size"],
        num_layers=vision_config["num_hidden_layers"],
        num_heads=vision_config["num_attention_heads"],
        intermediate_dim=vision_config["intermediate_size"],
        intermediate_activation=_activation(vision_config, directory),
        image_shape=(size, size, 3),
        layer_norm_epsilon=vision_config.get("layer_norm_eps", 1e-5),
    )
    embedding = tower.embedding
    loader.port_weight(embedding.patch_kernel, "embeddings.patch_embedding.weight",
                       hook_fn=lambda x, _: np.transpose(x, (2, 3, 1, 0)))
    loader.port_weight(embedding.position_embedding, "embeddings.position_embedding.weight")
    loader.port_weight(embedding.class_embedding, "embeddings.class_embedding")
    _port_layer_norm(loader, tower.pre_layer_norm, "pre_layrnorm")
    _port_encoder_layers(loader, tower.encoder_layers, "encoder.layers")
    _port_layer_norm(loader, tower.layer_norm, "post_layernorm")
    return ImageEncoder(tower, image_size=size, pooling="cls", **_image_preprocessing(directory, size))


def clip_text_encoder(directory, text_config, loader):
    """Builds the CLIP text tower (BPE tokenizer, causal transformer, pooled at end-of-text)."""
    import keras_hub

    for name in ("vocab.json", "merges.txt"):
        if not os.path.exists(os.path.join(directory, name)):
            raise CheckpointError(f"{directory!r} has no {name}: the CLIP tokenizer needs vocab.json and merges.txt")
    tokenizer = keras_hub.models.CLIPTokenizer(
        vocabulary=os.path.join(directory, "vocab.json"), merges=os.path.join(directory, "merges.txt")
    )
    length = text_config.get("max_position_embeddings", 77)
    tower = CLIPTextTower(
        vocabulary_size=text_config["vocab_size"],
        embedding_dim=text_config["hidden_size"],
        hidden_dim=text_config["hidden_size"],
        num_layers=text_config["num_hidden_layers"],
        num_heads=text_config["num_attention_heads"],
        intermediate_dim=text_config["intermediate_size"],
        intermediate_activation=_activation(text_config, directory),
        max_sequence_length=length,
        layer_norm_epsilon=text_config.get("layer_norm_eps", 1e-5),
    )
    loader.port_weight(tower.embedding.token_embedding._embeddings, "embeddings.token_embedding.weight")
    loader.port_weight(tower.embedding.position_embedding.position_embeddings, "embeddings.position_embedding.weight")
    _port_encoder_layers(loader, tower.encoder_layers, "encoder.layers")
    _port_layer_norm(loader, tower.layer_norm, "final_layer_norm")
    preprocessor = TextPreprocessor(
        tokenizer,
        sequence_length=length,
        start_token=tokenizer.start_token_id,
        end_token=tokenizer.end_token_id,
        pad_token=tokenizer.end_token_id,
        lowercase=True,
    )
    return TextEncoder(tower, preprocessor, pooling="last")


def bert_text_encoder(directory, text_config, loader):
    """Builds a BERT text tower with keras-hub's converter, pooled by BERT's pooler (CLIP-Italian)."""
    import keras_hub
    from keras_hub.src.utils.transformers import convert_bert

    from keras_clip_it.encoders.minilm.hf_bert_backbone import HFBertBackbone
    from keras_clip_it.encoders.minilm.minilm_converter import bert_tokenizer

    backbone = HFBertBackbone(
        **convert_bert.convert_backbone_config(text_config),
        activation=text_config.get("hidden_act", "gelu"),
        layer_norm_epsilon=text_config.get("layer_norm_eps", 1e-12),
    )
    convert_bert.convert_weights(backbone, loader, text_config)
    tokenizer_config = os.path.join(directory, "tokenizer_config.json")
    limit = read_config(directory, "tokenizer_config.json").get("model_max_length", 512) if os.path.exists(tokenizer_config) else 512
    length = int(min(limit, text_config.get("max_position_embeddings", 512)))
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(bert_tokenizer(directory), sequence_length=length)
    return TextEncoder(backbone, preprocessor, pooling="pooled")


def _vision_prefix(state, root):
    """Older VisionTextDualEncoder files nest the vision transformer once more ("vision_model.vision_model.")."""
    nested = f"{root}vision_model."
    return nested if any(key.startswith(nested) for key in state) else root


def load_dual_encoder_checkpoint(directory):
    """Reads a "clip" or "vision-text-dual-encoder" Hugging Face folder.

    Returns:
        `DualEncoderCheckpoint`.

    Example:
    >>> parts = load_dual_encoder_checkpoint("clip-italian")  # doctest: +SKIP
    >>> parts.text_encoder.embed(["un gatto"]).shape  # doctest: +SKIP
    """
    config = read_config(directory)
    model_type = config.get("model_type")
    state, source = read_state_dict(directory)
    loader = StateDictLoader(state, source)
    vision_config = config["vision_config"]
    vision_config = vision_config.get("vision_config", vision_config)  # a full CLIP config as vision side
    image_encoder = clip_vision_encoder(directory, vision_config, loader.with_prefix(_vision_prefix(state, "vision_model.")))
    text_config = config["text_config"]
    if model_type == "clip":
        text_encoder = clip_text_encoder(directory, text_config, loader.with_prefix("text_model."))
    elif model_type == "vision-text-dual-encoder":
        if text_config.get("model_type") != "bert":
            raise CheckpointError(
                f"{directory}: the text tower is {text_config.get('model_type')!r}; "
                "vision-text-dual-encoder checkpoints are supported with a BERT text tower"
            )
        text_encoder = bert_text_encoder(directory, text_config, loader.with_prefix("text_model."))
    else:
        raise CheckpointError(f"{directory}: model_type {model_type!r} is not a dual encoder this loader reads")
    image_projection = loader.get_tensor("visual_projection.weight").T.astype(np.float32)
    text_projection = loader.get_tensor("text_projection.weight").T.astype(np.float32)
    if image_projection.shape[0] != image_encoder.embedding_dim or text_projection.shape[0] != text_encoder.embedding_dim:
        raise CheckpointError(
            f"projections in {source} take {image_projection.shape[0]}/{text_projection.shape[0]} features but the "
            f"towers give {image_encoder.embedding_dim}/{text_encoder.embedding_dim}"
        )
    logit_scale = float(np.asarray(loader.get_tensor("logit_scale")).reshape(()))
    # position_ids are buffers older transformers saved; everything else must have found a place.
    unused = sorted(key for key in set(state) - loader.used if not key.endswith("position_ids"))
    if unused:
        raise CheckpointError(f"{source} has tensors this model does not use, e.g. {unused[:3]}: unsupported variant")
    return DualEncoderCheckpoint(
        image_encoder, text_encoder, image_projection, text_projection, logit_scale, int(image_projection.shape[1])
    )


def load_clip_vision_model(directory):
    """Reads a "clip_vision_model" folder (or the vision side of a "clip" one) as an `ImageEncoder`."""
    config = read_config(directory)
    state, source = read_state_dict(directory)
    vision_config = config.get("vision_config", config)
    prefix = "vision_model." if any(key.startswith("vision_model.") for key in state) else ""
    return clip_vision_encoder(directory, vision_config, StateDictLoader(state, source, prefix))
