"""Fixtures shared by the data tests: one cache folder and the sample tokenizer per session."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest

from stability.data.config import DataConfig
from stability.data.sample import SAMPLE_TOKENIZER, iter_sample_documents
from stability.data.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache folder, so tests never touch ~/.cache/stability."""
    return tmp_path_factory.mktemp("stability-cache")


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer(SAMPLE_TOKENIZER)


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A second, different tokenizer: 1500 pieces trained on the first 150 sample documents."""
    lines = [
        line
        for doc in islice(iter_sample_documents(), 150)
        for line in doc["text"].split("\n")
        if line
    ]
    path = tmp_path_factory.mktemp("tokenizer") / "small.model"
    path.write_bytes(train_tokenizer(lines, vocab_size=1500))
    return Tokenizer(path)


@pytest.fixture
def make_train_data(cache_dir: Path):
    """Builds TrainData on the sample corpus; keyword arguments override the defaults."""
    from stability.data import build_train_data

    def make(
        seed: int = 1234,
        global_batch_size: int = 8,
        micro_batch_size: int = 4,
        dp_rank: int = 0,
        dp_size: int = 1,
        train_samples: int = 256,
        **data: object,
    ):
        cfg = DataConfig(cache_dir=str(cache_dir), seq_length=32, **data)
        return build_train_data(
            cfg,
            seed=seed,
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            train_samples=train_samples,
        )

    return make
