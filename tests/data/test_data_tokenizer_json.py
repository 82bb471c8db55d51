"""A Hugging Face ``tokenizer.json`` as ``data.tokenizer`` (training and preprocess), and our
SentencePiece models converted to one that encodes exactly alike."""

from __future__ import annotations

import json
import pickle
from itertools import islice

import pytest

from stability.data.config import DataConfig
from stability.data.preprocess import main as preprocess_main
from stability.data.sample import SAMPLE_TOKENIZER, iter_sample_documents
from stability.data.tokenizer import (
    TRAINER_SETTINGS,
    HFTokenizer,
    Tokenizer,
    open_tokenizer,
)
from stability.errors import ConfigError
from stability.hf.tokenizer import TokenizerConversionError, special_tokens, spm_to_tokenizers

HARD = ["吾輩は猫である。名前はまだ無い。", "𠮷野家で牛丼を食べた🙂 ｶﾀｶﾅ ＡＢＣ ① ㈱",
        "Mixed 日本語 and English,\n\ttabs, two  spaces, trailing newline\n", " leading",
        "</s> <pad> <s> written as text", "", "   ", "1234567 digits"]


def save_json_tokenizer(model: bytes, folder, **config) -> None:
    """``model`` converted, as tokenizer.json + tokenizer_config.json in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(spm_to_tokenizers(model).to_str())
    specials = special_tokens(model)
    (folder / "tokenizer_config.json").write_text(json.dumps({**specials, **config}))


@pytest.fixture(scope="module")
def json_tokenizer(tmp_path_factory) -> HFTokenizer:
    folder = tmp_path_factory.mktemp("json")
    save_json_tokenizer(SAMPLE_TOKENIZER.read_bytes(), folder, split_special_tokens=True)
    return HFTokenizer(folder / "tokenizer.json")


def test_converted_sample_tokenizer_encodes_the_whole_corpus_alike(tokenizer, json_tokenizer):
    texts = [doc["text"] for doc in iter_sample_documents()] + HARD
    assert json_tokenizer.encode_batch(texts) == tokenizer.encode_batch(texts)
    assert [json_tokenizer.decode(ids) for ids in json_tokenizer.encode_batch(HARD)] == HARD
    assert (json_tokenizer.vocab_size, json_tokenizer.eod, json_tokenizer.bos,
            json_tokenizer.pad, json_tokenizer.unk) == (8192, 2, 1, 3, 0)


def test_a_normalizing_tokenizer_with_a_dummy_prefix_converts_too(tmp_path):
    # NFKC (a precompiled charsmap) and a "▁" put in front, as Llama 2's tokenizer has.
    import io

    import sentencepiece as spm

    lines = [line for doc in islice(iter_sample_documents(), 120)
             for line in doc["text"].split("\n") if line]
    settings = {**TRAINER_SETTINGS, "normalization_rule_name": "nmt_nfkc",
                "add_dummy_prefix": True}
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer,
                                   vocab_size=1200, **settings)
    (tmp_path / "nfkc.model").write_bytes(buffer.getvalue())
    save_json_tokenizer(buffer.getvalue(), tmp_path / "nfkc", split_special_tokens=True)
    ours, theirs = Tokenizer(tmp_path / "nfkc.model"), open_tokenizer(tmp_path / "nfkc")
    texts = [doc["text"] for doc in islice(iter_sample_documents(), 300)] + HARD
    assert theirs.encode_batch(texts) == ours.encode_batch(texts)
    assert [theirs.decode(ids) for ids in theirs.encode_batch(texts)] == \
        [ours.decode(ids) for ids in ours.encode_batch(texts)]


def test_settings_that_do_not_convert_are_refused(tmp_path):
    import io

    import sentencepiece as spm

    english = (doc for doc in iter_sample_documents() if doc["lang"] == "en")
    lines = [doc["text"].split("\n")[0] for doc in islice(english, 200)]
    for change, word in (({"model_type": "unigram"}, "model_type"),
                         ({"remove_extra_whitespaces": True}, "remove_extra_whitespaces"),
                         ({"user_defined_symbols": ["<tool>"]}, "user-defined")):
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer,
                                       vocab_size=600, **{**TRAINER_SETTINGS, **change})
        with pytest.raises(TokenizerConversionError, match=word):
            spm_to_tokenizers(buffer.getvalue())


def test_special_tokens_follow_tokenizer_config(tmp_path, json_tokenizer):
    model = SAMPLE_TOKENIZER.read_bytes()
    save_json_tokenizer(model, tmp_path / "plain")  # transformers' default: specials match
    plain = HFTokenizer(tmp_path / "plain" / "tokenizer.json")
    assert plain.encode("a</s>b")[1] == plain.eod
    assert json_tokenizer.eod not in json_tokenizer.encode("a</s>b")  # split_special_tokens
    assert plain.sha256 != json_tokenizer.sha256
    (tmp_path / "plain" / "tokenizer_config.json").unlink()  # no config: a known eos name
    assert HFTokenizer(tmp_path / "plain" / "tokenizer.json").eod == 2
    copy = pickle.loads(pickle.dumps(json_tokenizer))
    assert copy.encode(HARD[1]) == json_tokenizer.encode(HARD[1])
    assert copy.sha256 == json_tokenizer.sha256


def test_a_tokenizer_without_an_end_of_document_token_is_refused(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    Backend(WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no end-of-document token"):
        HFTokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError) as error:
        from stability.data.train_data import load_tokenizer

        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "tokenizer.json")))
    assert error.value.key == "data.tokenizer"


def test_preprocess_and_training_data_take_a_tokenizer_json(tmp_path, cache_dir,
                                                            json_tokenizer):
    from stability.data import build_train_data
    from stability.data.indexed import read_metadata

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d["text"]}) + "\n"
                            for d in islice(iter_sample_documents(), 40)))
    folder = json_tokenizer.model_path.parent
    assert preprocess_main(["--input", str(docs), "--output-prefix", str(tmp_path / "d"),
                            "--tokenizer", str(folder)]) == 0
    assert read_metadata(tmp_path / "d")["tokenizer_sha256"] == json_tokenizer.sha256
    cfg = DataConfig(name="indexed", path=str(tmp_path / "d"), tokenizer=str(folder),
                     cache_dir=str(cache_dir), seq_length=32, split="1")
    cfg.validate()
    cfg.check_files()
    data = build_train_data(cfg, seed=1, global_batch_size=4, micro_batch_size=4, dp_rank=0,
                            dp_size=1, train_samples=8)
    assert isinstance(data.tokenizer, HFTokenizer)
    tokens = data.loader.next_micro_batch()["tokens"]
    assert tokens.shape == (4, 32) and int(tokens.max()) < 8192
    # A dataset made with another tokenizer is refused.
    sample = DataConfig(name="indexed", path=str(tmp_path / "d"), cache_dir=str(cache_dir))
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_train_data(sample, seed=1, global_batch_size=4, micro_batch_size=4, dp_rank=0,
                         dp_size=1, train_samples=8)
    with pytest.raises(ConfigError) as error:
        DataConfig(tokenizer=str(tmp_path / "missing.json")).check_files()
    assert error.value.key == "data.tokenizer"
