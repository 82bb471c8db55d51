"""The byte-fallback tokenizer: Japanese round-trips and never becomes unknown tokens."""

from __future__ import annotations

import pickle
from itertools import islice

import pytest

from stability.data.sample import iter_sample_documents
from stability.data.tokenizer import EOD_ID, PAD_ID, Tokenizer, train_tokenizer

HARD_TEXTS = [
    "吾輩は猫である。名前はまだ無い。",
    "𠮷野家で牛丼を食べた🙂 ｶﾀｶﾅ ＡＢＣ ① ㈱",  # a non-BMP kanji, half/full width, emoji
    "Mixed 日本語 and English,\n\ttabs, two  spaces, and a trailing newline\n",
    " leading space, 「かぎ括弧」と『二重かぎ括弧』。",
]


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_text_round_trips_without_unknown_ids(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.unk not in ids
    assert tokenizer.decode(ids) == text


def test_all_japanese_sample_text_round_trips_without_unknown_ids(tokenizer: Tokenizer):
    documents = list(iter_sample_documents())
    assert {doc["lang"] for doc in documents} == {"en", "ja"}
    texts = [doc["text"] for doc in documents if doc["lang"] == "ja"]
    encoded = tokenizer.encode_batch(texts)
    assert all(tokenizer.unk not in ids for ids in encoded)
    assert [tokenizer.decode(ids) for ids in encoded] == texts


def test_japanese_is_compressed_not_just_bytes(tokenizer: Tokenizer) -> None:
    text = "パッケージをインストールするには、次のコマンドを実行します。"
    assert len(tokenizer.encode(text)) < len(text)  # learned pieces, not 3 bytes per char


def test_special_ids_are_distinct_and_never_produced(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 8192
    assert (tokenizer.eod, tokenizer.pad) == (EOD_ID, PAD_ID)
    assert len({tokenizer.unk, tokenizer.bos, tokenizer.eod, tokenizer.pad}) == 4
    ids = tokenizer.encode("</s> <pad> <s> <unk>")  # special pieces are not parsed from text
    assert not {tokenizer.eod, tokenizer.pad, tokenizer.bos, tokenizer.unk} & set(ids)
    assert tokenizer.unique_identifiers["sha256"] == tokenizer.sha256


def test_tokenizer_survives_pickling(tokenizer: Tokenizer) -> None:
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.encode(HARD_TEXTS[1]) == tokenizer.encode(HARD_TEXTS[1])
    assert copy.sha256 == tokenizer.sha256


def test_training_is_deterministic_and_keeps_byte_fallback(tmp_path) -> None:
    lines = [
        line
        for doc in islice(iter_sample_documents(), 150)
        for line in doc["text"].split("\n")
        if line
    ]
    first = train_tokenizer(lines, vocab_size=1500)
    assert train_tokenizer(lines, vocab_size=1500) == first
    (tmp_path / "small.model").write_bytes(first)
    small = Tokenizer(tmp_path / "small.model")
    assert small.vocab_size == 1500
    ids = small.encode(HARD_TEXTS[1])
    assert small.unk not in ids and small.decode(ids) == HARD_TEXTS[1]


def test_missing_model_names_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
