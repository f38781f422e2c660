"""keras-hub's BERT tokenizer with Hugging Face's text normalisation, so token ids match `tokenizers` exactly."""

import keras
from keras_hub.src.models.bert.bert_tokenizer import BertTokenizer
from keras_hub.src.tokenizers.word_piece_tokenizer import get_special_tokens_pattern
from keras_hub.src.tokenizers.word_piece_tokenizer import pretokenize
from keras_hub.src.utils.tensor_utils import assert_tf_libs_installed
from keras_hub.src.utils.tensor_utils import preprocessing_function

try:
    import tensorflow as tf
    import tensorflow_text as tf_text
except ImportError:  # the error comes from `assert_tf_libs_installed` when the tokenizer is used
    tf = tf_text = None

# Hugging Face's BertNormalizer (tokenizers, normalizers/bert.rs), as RE2 patterns.
# Control and format characters are deleted, not split on: "c\u200bd" (zero-width space) is one word, and a
# zero-width joiner does not cut an emoji sequence into several [UNK]s. Tab, newline and return are whitespace.
CONTROL_REGEX = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F\p{Cf}\p{Co}\x{FFFD}]"
# Every Unicode space becomes " "; keras-hub's RE2 `\s` only knows ASCII spaces, so "a\u00a0b" was one word.
WHITESPACE_REGEX = r"[\t\n\r\p{Zs}\p{Zl}\p{Zp}]"
# The CJK ideographs Hugging Face surrounds with spaces; its range starts at U+2B920 where keras-hub's starts
# at U+2B820, so the padding is done here and keras-hub's own CJK split is turned off.
CJK_REGEX = (
    r"[\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}"
    r"\x{2B920}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}]"
)


@keras.saving.register_keras_serializable(package="keras_clip_it")
class HFBertTokenizer(BertTokenizer):
    """A keras-hub `BertTokenizer` that normalises text the way Hugging Face's BERT tokenizer does.

    keras-hub's WordPiece lowercases with Unicode case folding (NFKC_Casefold), which recomposes Korean
    jamo, turns "ß" into "ss" and "ﬁ" into "fi", and it never strips accents unless told to, so
    "caffè" becomes [UNK] where Hugging Face (and sentence-transformers) see "caffe". It also splits words on
    format characters that Hugging Face deletes, misses non-ASCII spaces, counts the 100-character word limit
    in bytes, and splits "[SEP]" typed in a text into "[", "sep", "]". This tokenizer applies Hugging Face's
    `BertNormalizer` (clean text, pad CJK ideographs, NFD + drop accents, per-character lowercase) and its
    pre-tokenizer and WordPiece limits in TensorFlow ops, so the same graph runs eagerly, in `tf.data` and
    after a `.keras` reload, and the ids equal `tokenizers`' on every code point whose Unicode properties
    the two libraries agree on (they disagree only on a few hundred characters added in Unicode 11 and
    later, in historic or minority scripts).

    Args:
        vocabulary: a list of WordPiece tokens or the path of a `vocab.txt`.
        lowercase: lowercase every character (Hugging Face's `do_lower_case`).
        strip_accents: drop combining accents after NFD; None follows `lowercase`, as Hugging Face does.
        split_on_cjk: put each CJK ideograph in its own word (`tokenize_chinese_chars`).
        max_chars_per_word: longer words become the unknown token (`max_input_chars_per_word`).
        **kwargs: passed to `keras_hub.models.BertTokenizer` (e.g. `sequence_length`, `dtype`).

    Example:
    >>> tokenizer = HFBertTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "il", "caffe", "!"])
    >>> [[int(i) for i in ids] for ids in tokenizer(["Il caffè!", "ÈCCO [SEP]"])]
    [[5, 6, 7], [1, 3]]
    """

    def __init__(
        self, vocabulary=None, lowercase=True, strip_accents=None, split_on_cjk=True, max_chars_per_word=100,
        **kwargs,
    ):
        # Read by `_set_vocabulary_tf`, which the parent constructor calls.
        self.max_chars_per_word = int(max_chars_per_word)
        kwargs.pop("special_tokens_in_strings", None)  # always on, as in Hugging Face
        super().__init__(
            vocabulary=vocabulary,
            lowercase=bool(lowercase),
            strip_accents=bool(lowercase if strip_accents is None else strip_accents),
            split_on_cjk=bool(split_on_cjk),
            special_tokens_in_strings=True,
            **kwargs,
        )

    def _use_tf_workflow(self):
        # keras-hub's pure-Python path normalises differently; one implementation serves eager calls and tf.data.
        assert_tf_libs_installed(self.__class__.__name__)
        return True

    def _set_vocabulary_tf(self):
        # The limit is in characters, checked in `_tokenize_tf`; tf-text's own limit is in bytes, so it is
        # set where no word within the character limit can reach it (4 bytes per UTF-8 character at most).
        self._fast_word_piece = tf_text.FastWordpieceTokenizer(
            vocab=self.vocabulary,
            token_out_type=self.compute_dtype,
            suffix_indicator=self.suffix_indicator,
            unknown_token=self.oov_token,
            max_bytes_per_word=4 * self.max_chars_per_word + 1,
            no_pretokenization=True,
            support_detokenization=True,
        )

    def _special_pattern(self):
        tokens = sorted(set(self.special_tokens) | {self.oov_token}, key=lambda token: (-len(token), token))
        return get_special_tokens_pattern(tokens)

    def normalize(self, texts):
        """Hugging Face's `BertNormalizer` on a string tensor of any shape (special tokens not protected)."""
        texts = tf.strings.regex_replace(texts, CONTROL_REGEX, "")
        texts = tf.strings.regex_replace(texts, WHITESPACE_REGEX, " ")
        if self.split_on_cjk:
            texts = tf.strings.regex_replace(texts, f"({CJK_REGEX})", r" \1 ")
        if self.strip_accents:
            texts = tf.strings.regex_replace(tf_text.normalize_utf8(texts, "NFD"), r"\p{Mn}", "")
        if self.lowercase:
            # ICU lowercases a word-final capital sigma to "ς"; Hugging Face maps each character alone ("σ").
            texts = tf.strings.lower(tf.strings.regex_replace(texts, "Σ", "σ"), encoding="utf-8")
        return texts

    @preprocessing_function
    def _tokenize_tf(self, inputs):
        self._maybe_initialized_tf()
        if not isinstance(inputs, tf.RaggedTensor):
            inputs = tf.convert_to_tensor(inputs)
        unbatched = inputs.shape.rank == 0
        if unbatched:
            inputs = tf.expand_dims(inputs, 0)
        # Special tokens typed in a text are matched before normalisation and never changed, as Hugging
        # Face's added tokens are; every other piece is normalised, then split on spaces and punctuation.
        # tf-text's regex_split stops at a NUL byte; \x01 is a control character the normaliser deletes too.
        inputs = tf.strings.regex_replace(inputs, r"\x00", "\x01")
        special = self._special_pattern()
        pieces = tf_text.regex_split(inputs, delim_regex_pattern=special, keep_delim_regex_pattern=special)
        flat = pieces.flat_values
        flat = tf.where(tf.strings.regex_full_match(flat, special), flat, self.normalize(flat))
        words = pretokenize(flat, lowercase=False, strip_accents=False, split=True, split_on_cjk=False,
                            special_tokens_pattern=special)
        words = pieces.with_flat_values(words).merge_dims(-2, -1)
        too_long = tf.strings.length(words.flat_values, unit="UTF8_CHAR") > self.max_chars_per_word
        words = words.with_flat_values(tf.where(too_long, self.oov_token, words.flat_values))

        tokens = self._fast_word_piece.tokenize(words).merge_dims(-2, -1)
        if self.sequence_length:
            shape = tokens.shape.as_list()
            shape[-1] = self.sequence_length
            tokens = tokens.to_tensor(shape=shape)
        if unbatched:
            tokens = tf.squeeze(tokens, 0)
        return tokens

    def get_config(self):
        config = super().get_config()
        config.pop("special_tokens_in_strings", None)
        return {**config, "split_on_cjk": self.split_on_cjk, "max_chars_per_word": self.max_chars_per_word}
