"""``data.blend``: megatron-style blends of indexed datasets through megatron-core's
BlendedMegatronDatasetBuilder draw from every dataset in the stated proportion, and train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stability.data.config import BlendPerSplit, DataConfig
from stability.data.preprocess import preprocess
from stability.data.tokenizer import Tokenizer
from stability.errors import ConfigError

ENGLISH = "The cat sat on the mat and looked at the dog. "
DIGITS = "01234567899876543210"


def make_indexed(folder: Path, name: str, text: str, documents: int,
                 tokenizer: Tokenizer) -> str:
    """A .bin/.idx pair of ``documents`` documents of ``text`` repeated, made by preprocess."""
    source = folder / f"{name}.jsonl"
    source.write_text("".join(json.dumps({"text": text * (8 + i % 5)}) + "\n"
                              for i in range(documents)))
    preprocess([source], folder / name, tokenizer, "text", workers=1)
    return str(folder / name)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, tokenizer):
    """Two datasets whose samples tell where they come from: English and digits (disjoint
    token ids but the end of document), and the tokens of the digits one."""
    folder = tmp_path_factory.mktemp("blend")
    english = make_indexed(folder, "english", ENGLISH, 60, tokenizer)
    digits = make_indexed(folder, "digits", DIGITS, 30, tokenizer)
    digit_ids = set(tokenizer.encode(DIGITS))
    assert not digit_ids & set(tokenizer.encode(ENGLISH * 3))
    return english, digits, digit_ids


def from_digits(dataset, count: int, digit_ids: set[int]) -> float:
    """The share of the first ``count`` samples that come from the digits dataset."""
    hits = [bool(digit_ids & set(dataset[i]["tokens"].tolist())) for i in range(count)]
    return float(np.mean(hits))


def build(cache_dir, train_samples=400, **data):
    from stability.data import build_train_data

    cfg = DataConfig(name="indexed", cache_dir=str(cache_dir), seq_length=32, **data)
    cfg.validate()
    cfg.check_files()
    return build_train_data(cfg, seed=1, global_batch_size=8, micro_batch_size=8, dp_rank=0,
                            dp_size=1, train_samples=train_samples)


def test_weighted_blend_draws_in_the_stated_proportion(cache_dir, corpora):
    english, digits, digit_ids = corpora
    data = build(cache_dir, blend=[0.25, english, 0.75, digits], split="9,1,0")
    assert type(data.train).__name__ == "BlendedDataset"
    assert data.prefixes == [Path(english), Path(digits)]
    # megatron's blending index is greedy: every prefix of it is within a sample of the
    # weights, and the digits dataset (smaller) repeats past its epoch.
    for count in (8, 40, 400):
        assert from_digits(data.train, count, digit_ids) == pytest.approx(0.75, abs=1 / count)
    assert data.valid is not None
    assert from_digits(data.valid, len(data.valid), digit_ids) == pytest.approx(0.75, abs=0.1)
    # The loader's batches are the dataset's samples in order: both sources in each batch.
    batch = data.loader.next_micro_batch()["tokens"]
    rows = [bool(digit_ids & set(row.tolist())) for row in batch]
    assert 0 < sum(rows) < len(rows)


def test_blend_without_weights_mixes_by_size(cache_dir, corpora):
    english, digits, digit_ids = corpora
    data = build(cache_dir, blend=[english, digits], split="1")
    from stability.data.train_data import split_samples

    sizes = [split_samples(p, (0.0, 1.0), 32) for p in (english, digits)]
    assert from_digits(data.train, 200, digit_ids) == pytest.approx(
        sizes[1] / sum(sizes), abs=1 / 200)


def test_blend_per_split(cache_dir, corpora):
    english, digits, digit_ids = corpora
    data = build(cache_dir, blend_per_split=BlendPerSplit(train=[0.5, english, 0.5, digits],
                                                          valid=[digits]))
    assert from_digits(data.train, 100, digit_ids) == pytest.approx(0.5, abs=0.01)
    assert from_digits(data.valid, len(data.valid), digit_ids) == 1.0
    assert data.test is None


def test_a_blend_trains(tmp_path, cache_dir, corpora, single_process):
    from helpers import make_config, make_trainer

    english, digits, digit_ids = corpora
    cfg = make_config("data.name=indexed", f"data.blend=[0.25,{english},0.75,{digits}]",
                      "data.split=1", f"data.cache_dir={cache_dir}", "data.seq_length=32",
                      "trainer.train_steps=3", "checkpoint.save_final=false",
                      "logger.console=false", "optim.lr=3e-3")
    assert cfg.data.blend == [0.25, english, 0.75, digits]
    trainer = make_trainer(cfg, tmp_path, [], single_process)
    summary = trainer.fit()
    assert summary["status"] == "completed" and np.isfinite(summary["final_loss"])
    assert trainer.data.loader.consumed_samples == 24
    assert from_digits(trainer.data.train, 24, digit_ids) == pytest.approx(0.75, abs=1 / 24)


@pytest.mark.parametrize("fields, key", [
    ({"blend": [0.3, "a", "b"]}, "data.blend"),
    ({"blend": [0.3, "a", -1, "b"]}, "data.blend"),
    ({"blend": ["a", 0.5]}, "data.blend"),
    ({"blend": []}, "data.path"),
    ({"blend": ["a"], "path": "b"}, "data.blend"),
    ({"blend": ["a"], "name": "sample"}, "data.name"),
    ({"blend_per_split": BlendPerSplit(valid=["a"])}, "data.blend_per_split.train"),
    ({"blend_per_split": BlendPerSplit(train=["a", 1])}, "data.blend_per_split.train"),
    ({"blend_per_split": BlendPerSplit(train=["a"]), "blend": ["b"]},
     "data.blend_per_split"),
])
def test_malformed_blends_are_refused(fields, key):
    fields = {"name": "indexed", **fields}
    with pytest.raises(ConfigError) as error:
        DataConfig(**fields).validate()
    assert error.value.key == key


def test_blends_from_the_command_line():
    from helpers import make_config

    cfg = make_config("data.name=indexed", "data.blend=[0.3,data/ja,0.7,data/en]")
    assert cfg.data.blends() == ((["data/ja", "data/en"], [0.3, 0.7]), None)
    cfg = make_config("data.name=indexed",
                      "data.blend_per_split={train:[0.3,data/ja,0.7,data/en],valid:[data/v]}")
    assert cfg.data.blends() == (None, [(["data/ja", "data/en"], [0.3, 0.7]),
                                        (["data/v"], None), None])
    with pytest.raises(ConfigError, match="data.blend_per_split.dev"):
        make_config("+data.blend_per_split.dev=[x]")  # past Hydra's struct check


def test_missing_blended_dataset_is_named(corpora):
    english, _, _ = corpora
    cfg = DataConfig(name="indexed", blend=[1, english, 1, "/nowhere/x"])
    with pytest.raises(ConfigError, match="/nowhere/x") as error:
        cfg.check_files()
    assert error.value.key == "data.blend"


def test_a_held_out_split_a_dataset_cannot_fill_is_refused(cache_dir, corpora, tmp_path,
                                                           tokenizer):
    english, _, _ = corpora
    one = make_indexed(tmp_path, "one", DIGITS, 1, tokenizer)  # no document to hold out
    with pytest.raises(ConfigError, match="valid split") as error:
        build(cache_dir, blend=[0.5, english, 0.5, one], split="9,1,0")
    assert error.value.key == "data.blend"
