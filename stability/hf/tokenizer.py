"""A SentencePiece BPE model as a Hugging Face ``tokenizer.json`` that encodes text alike.

SentencePiece's BPE encoder starts from the characters of the normalized text (spaces written
as "▁", a "▁" put in front when ``add_dummy_prefix``) and repeatedly merges the adjacent pair
whose concatenation is the vocabulary piece with the highest score; characters left outside
the vocabulary become their UTF-8 bytes (``<0xE3>`` ...) under byte fallback. The ``tokenizers``
library's BPE model does the same with a ranked merge list, so the conversion is: the
vocabulary in id order, the merges (a, b) for every normal piece ab whose halves are normal
pieces, ranked by the piece's score (ties by id), the same normalizer and byte fallback, and
the control pieces (``<s>``, ``</s>``, ``<pad>``, ``<unk>``) as special tokens.

What cannot be matched is refused in one line (:class:`TokenizerConversionError`): a Unigram
model, ``remove_extra_whitespaces``, user-defined pieces. The tests compare both encoders on
the whole sample corpus.
"""

from __future__ import annotations

from typing import Any

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class TokenizerConversionError(ValueError):
    """A SentencePiece setting ``tokenizers`` cannot reproduce; the message names it."""


def _model_proto(model_bytes: bytes) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    return proto


def spm_to_tokenizers(model_bytes: bytes):
    """A ``tokenizers.Tokenizer`` that encodes and decodes like the SentencePiece BPE model
    ``model_bytes`` (the content of a ``.model`` file).

    Raises:
        TokenizerConversionError: A setting the conversion cannot reproduce, named.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    proto = _model_proto(model_bytes)
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != 2:  # UNIGRAM=1, BPE=2, WORD=3, CHAR=4
        raise TokenizerConversionError(
            f"model_type={trainer.model_type}: only SentencePiece BPE models (2) convert")
    if normalizer.remove_extra_whitespaces:
        raise TokenizerConversionError(
            "remove_extra_whitespaces=true: tokenizers has no equivalent normalizer")
    if any(p.type == _USER_DEFINED for p in proto.pieces):
        raise TokenizerConversionError("user-defined pieces are not converted")
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    merges = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-score, index, normal[left][1], normal[right][1], left, right))
    merges.sort()
    unk = proto.pieces[trainer.unk_id].piece
    model = BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk,
                fuse_unk=True, byte_fallback=trainer.byte_fallback)
    tokenizer = Tokenizer(model)
    steps = []
    if normalizer.precompiled_charsmap:
        steps.append(normalizers.Precompiled(normalizer.precompiled_charsmap))
    if normalizer.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if normalizer.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if steps:
        tokenizer.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if normalizer.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)
    tokenizer.add_special_tokens([
        AddedToken(p.piece, special=True, normalized=False)
        for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN)])
    return tokenizer


def special_tokens(model_bytes: bytes) -> dict[str, str]:
    """The special pieces of a SentencePiece model under transformers' names (``bos_token``,
    ``eos_token``, ``unk_token``, ``pad_token``), for those it has."""
    proto = _model_proto(model_bytes)
    trainer = proto.trainer_spec
    out = {}
    for name, index in (("bos_token", trainer.bos_id), ("eos_token", trainer.eos_id),
                        ("unk_token", trainer.unk_id), ("pad_token", trainer.pad_id)):
        if 0 <= index < len(proto.pieces):
            out[name] = proto.pieces[index].piece
    return out
