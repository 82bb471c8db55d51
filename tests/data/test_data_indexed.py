"""The tokenized sample corpus in megatron's .bin/.idx format, built once into the cache."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from stability.data.cache import build_once, cache_root
from stability.data.indexed import read_metadata, sample_cache_key, sample_dataset_prefix
from stability.data.sample import iter_sample_documents
from stability.data.tokenizer import Tokenizer


def test_sample_dataset_holds_every_document_with_eod(cache_dir: Path, tokenizer: Tokenizer):
    prefix = sample_dataset_prefix(tokenizer, cache_dir)
    dataset = IndexedDataset(str(prefix))
    documents = list(iter_sample_documents())
    assert len(dataset) == len(documents)
    assert len(dataset.document_indices) == len(documents) + 1
    for i in (0, 1, len(documents) - 1):
        ids = dataset[i]
        assert ids[-1] == tokenizer.eod
        assert tokenizer.decode(ids[:-1]) == documents[i]["text"]
    metadata = read_metadata(prefix)
    assert metadata["tokens"] == int(dataset.sequence_lengths.sum())
    assert metadata["tokenizer_sha256"] == tokenizer.sha256


def test_cache_key_follows_the_tokenizer(tokenizer: Tokenizer, small_tokenizer: Tokenizer):
    assert sample_cache_key(small_tokenizer) != sample_cache_key(tokenizer)
    assert sample_cache_key(tokenizer) == sample_cache_key(Tokenizer(tokenizer.model_path))


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STABILITY_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("STABILITY_CACHE")
    assert cache_root() == Path.home() / ".cache" / "stability"


def test_failed_build_leaves_nothing_and_is_retried(tmp_path: Path) -> None:
    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(tmp_path / "artifact", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact.lock"]
    build_once(tmp_path / "artifact", lambda folder: (folder / "ok").write_text("1"))
    assert (tmp_path / "artifact" / "ok").read_text() == "1"


def _build_in_child(cache: str, barrier, results) -> None:
    """Child process: build the sample dataset and its batches at the same moment as a twin."""
    from stability.data import build_train_data
    from stability.data.config import DataConfig

    barrier.wait()
    data = build_train_data(
        DataConfig(cache_dir=cache, seq_length=32),
        seed=7,
        global_batch_size=4,
        micro_batch_size=4,
        dp_rank=0,
        dp_size=1,
        train_samples=64,
    )
    results.put((str(data.prefix), data.loader.next_micro_batch()["tokens"].sum().item()))


def test_two_processes_building_at_once_get_one_good_dataset(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")  # inherits megatron, already imported
    barrier, results = context.Barrier(2), context.Queue()
    children = [
        context.Process(target=_build_in_child, args=(str(tmp_path), barrier, results))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert outcomes[0] == outcomes[1]
    sample_folder = Path(outcomes[0][0]).parent
    assert sample_folder.name.startswith("sample-")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(
        ["gpt-indices", sample_folder.name]
    )
    (index_folder,) = [p for p in (tmp_path / "gpt-indices").iterdir() if p.is_dir()]
    assert len(list(index_folder.glob("*-GPTDataset-train-*.npy"))) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders
    assert len(IndexedDataset(outcomes[0][0])) == len(list(iter_sample_documents()))
