"""Strings to the token ids and padding mask a text backbone takes, in a graph that runs in tf.data."""

import keras
from keras_hub.src.layers.preprocessing.preprocessing_layer import PreprocessingLayer
from keras_hub.src.layers.preprocessing.start_end_packer import StartEndPacker


try:
    import tensorflow as tf
except ImportError:  # keras-hub's tokenizers need TensorFlow; the error comes from them when used
    tf = None


@keras.saving.register_keras_serializable(package="keras_clip_it")
class TextPreprocessor(PreprocessingLayer):
    """Tokenises, adds start/end tokens, truncates and pads: {"token_ids", "padding_mask"}.

    keras-hub's task preprocessors also handle labels and images; a text tower needs only this, for
    any keras-hub tokenizer. Like keras-hub's layers it runs plain Python when called eagerly and a
    TensorFlow graph inside tf.data. The packer is made on first use, after a reloaded tokenizer has
    its vocabulary back from the saved assets.

    Args:
        tokenizer: a keras-hub tokenizer.
        sequence_length: length of the packed sequences, start and end tokens included.
        start_token: id put first, or None.
        end_token: id put last (kept when truncating), or None.
        pad_token: id of padding positions.
        lowercase: lowercase the text first (CLIP's tokenizer does).

    Example:
    >>> import keras_hub
    >>> tokenizer = keras_hub.models.BertTokenizer(vocabulary=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat"])
    >>> TextPreprocessor(tokenizer, 4, start_token=2, end_token=3)(["cat"])["token_ids"].tolist()
    [[2, 5, 3, 0]]
    """

    def __init__(self, tokenizer, sequence_length, start_token=None, end_token=None, pad_token=0,
                 lowercase=False, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.sequence_length = int(sequence_length)
        self.start_token = start_token
        self.end_token = end_token
        self.pad_token = pad_token
        self.lowercase = lowercase
        self._packer = None

    def call(self, texts):
        if self._packer is None:
            self._packer = StartEndPacker(
                start_value=self.start_token,
                end_value=self.end_token,
                pad_value=self.pad_token,
                sequence_length=self.sequence_length,
                return_padding_mask=True,
            )
        if self.lowercase:
            if self._use_tf_workflow():
                texts = tf.strings.lower(texts, encoding="utf-8")
            else:
                texts = [text.lower() for text in ([texts] if isinstance(texts, str) else texts)]
        token_ids, padding_mask = self._packer(self.tokenizer(texts))
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def get_config(self):
        return {
            **super().get_config(),
            "tokenizer": keras.layers.serialize(self.tokenizer),
            "sequence_length": self.sequence_length,
            "start_token": self.start_token,
            "end_token": self.end_token,
            "pad_token": self.pad_token,
            "lowercase": self.lowercase,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["tokenizer"] = keras.layers.deserialize(config["tokenizer"])
        return cls(**config)
