"""Everything a run needs from the data pipeline, built from `DataConfig` on every rank.

`build_train_data` loads the tokenizer, finds or builds the .bin/.idx pair (the cached sample, or
the user's `data.path`), builds megatron-core's train/valid/test `GPTDataset`s through
`BlendedMegatronDatasetBuilder`, and wraps the train split in this rank's `BatchLoader`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from stability.data.cache import cache_root, file_lock
from stability.data.config import DataConfig
from stability.data.indexed import indexed_exists, read_metadata, sample_dataset_prefix
from stability.data.loader import Batch, BatchLoader, check_batch_shape, eval_batches
from stability.data.sample import tokenizer_path
from stability.data.tokenizer import Tokenizer
from stability.errors import ConfigError


@dataclass
class TrainData:
    """What training needs from the data pipeline.

    Attributes:
        tokenizer: The tokenizer of the dataset (its vocab size sizes the model).
        loader: This rank's training micro batches.
        train: The train-split GPTDataset behind `loader`.
        valid: The validation-split GPTDataset (one epoch), or None when the split is empty.
        test: The test-split GPTDataset (one epoch), or None when the split is empty.
        prefix: The .bin/.idx prefix the splits read.
    """

    tokenizer: Tokenizer
    loader: BatchLoader
    train: GPTDataset
    valid: GPTDataset | None
    test: GPTDataset | None
    prefix: Path

    def eval_batches(
        self, micro_batch_size: int, max_samples: int | None = None
    ) -> Iterator[Batch]:
        """This rank's validation micro batches (see `eval_batches`); none without a split."""
        if self.valid is None:
            return iter(())
        return eval_batches(
            self.valid,
            micro_batch_size,
            dp_rank=self.loader.dp_rank,
            dp_size=self.loader.dp_size,
            max_samples=max_samples,
        )


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The configured tokenizer: a shipped one by name (`sample`, `sample-2k`; None is
    `sample`), or a file."""
    path = tokenizer_path(cfg.tokenizer)
    if not path.is_file():
        raise ConfigError("data.tokenizer", cfg.tokenizer, "an existing SentencePiece .model file")
    try:
        return Tokenizer(path)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(
            "data.tokenizer", cfg.tokenizer, f"a byte-fallback SentencePiece model ({error})"
        ) from error


def dataset_prefix(cfg: DataConfig, tokenizer: Tokenizer) -> Path:
    """The .bin/.idx prefix to train on: the cached sample, or the user's checked pair."""
    if cfg.name == "sample":
        return sample_dataset_prefix(tokenizer, cache_root(cfg.cache_dir))
    if cfg.name != "indexed":
        raise ConfigError("data.name", cfg.name, '"sample" or "indexed"')
    if not cfg.path:
        raise ConfigError("data.path", cfg.path, 'a .bin/.idx prefix when data.name is "indexed"')
    prefix = Path(cfg.path).expanduser()
    if not indexed_exists(prefix):
        raise ConfigError(
            "data.path",
            cfg.path,
            "the prefix of an existing PREFIX.bin + PREFIX.idx pair "
            "(make one with python -m stability.data.preprocess)",
        )
    metadata = read_metadata(prefix)
    if metadata and metadata.get("tokenizer_sha256") != tokenizer.sha256:
        raise ConfigError(
            "data.tokenizer",
            cfg.tokenizer,
            f"the tokenizer {cfg.path} was built with (sha256 {metadata['tokenizer_sha256']}, "
            f"vocab {metadata['vocab_size']}); this one has sha256 {tokenizer.sha256}",
        )
    return prefix


def _check_split(split: str, num_documents: int) -> None:
    """Rejects split strings megatron would misread, and a train split with no document."""
    try:
        weights = [float(part) for part in split.split(",")]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or weights[0] <= 0:
        raise ConfigError(
            "data.split", split, 'one to three weights >= 0 like "969,30,1", train > 0'
        )
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    begin, end = convert_split_vector_to_split_matrix([w / total for w in weights])[0]
    if round(end * num_documents) - round(begin * num_documents) < 1:
        raise ConfigError(
            "data.split",
            split,
            f"a split giving training at least one of {num_documents} documents",
        )


def build_gpt_datasets(
    prefix: Path, tokenizer: Tokenizer, cfg: DataConfig, *, seed: int, train_samples: int
) -> list[GPTDataset | None]:
    """Builds the train/valid/test GPTDatasets of one .bin/.idx pair (indices cached on disk).

    Call it on every rank: under torch.distributed, megatron builds on rank 0 first and the
    other ranks wait at a barrier and then load the cached indices.
    """
    if cfg.seq_length < 1:
        raise ConfigError("data.seq_length", cfg.seq_length, "an integer >= 1")
    if train_samples < 1:
        raise ConfigError("train_samples", train_samples, "an integer >= 1")
    num_documents = len(IndexedDataset(str(prefix)).document_indices) - 1
    _check_split(cfg.split, num_documents)
    index_cache = cache_root(cfg.cache_dir) / "gpt-indices" / _file_version(prefix)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=cfg.seq_length,
        blend=([str(prefix)], None),
        split=cfg.split,
        path_to_cache=str(index_cache),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, None, None], lambda: True, config
    )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        return builder.build()  # rank 0 holds the lock; megatron's barrier orders us after it
    # megatron writes its index files in place: one builder at a time per cache folder.
    with file_lock(index_cache.parent / f"{index_cache.name}.lock"):
        return builder.build()


def _file_version(prefix: Path) -> str:
    """Names the current content of a .bin/.idx pair (paths, sizes, modification times).

    megatron keys its cached indices by the dataset path only; adding this key means that a
    pair rewritten in place (preprocess run again) never meets the indices of its old content.
    """
    stats = [Path(f"{prefix}{ext}").resolve() for ext in (".bin", ".idx")]
    text = ";".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in stats)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_train_data(
    cfg: DataConfig,
    *,
    seed: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    train_samples: int,
) -> TrainData:
    """Tokenizer, datasets and this rank's loader for a run; call it on every rank.

    Args:
        cfg: The data configuration.
        seed: Shuffles documents and samples (same seed, same batches).
        global_batch_size: Samples per optimizer step over all data-parallel ranks.
        micro_batch_size: Samples per forward/backward on one rank.
        dp_rank: This rank's data-parallel index.
        dp_size: Number of data-parallel ranks.
        train_samples: Samples the run plans to read (global batches * global_batch_size);
            more than one epoch repeats the data, reshuffled.

    Raises:
        ConfigError: For a bad data setting, naming the key and the value.
    """
    check_batch_shape(global_batch_size, micro_batch_size, dp_rank, dp_size)
    tokenizer = load_tokenizer(cfg)
    prefix = dataset_prefix(cfg, tokenizer)
    train, valid, test = build_gpt_datasets(
        prefix, tokenizer, cfg, seed=seed, train_samples=train_samples
    )
    loader = BatchLoader(
        train,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=cfg.num_workers,
    )
    valid = valid if valid is not None and len(valid) > 0 else None
    test = test if test is not None and len(test) > 0 else None
    return TrainData(tokenizer, loader, train, valid, test, prefix)
