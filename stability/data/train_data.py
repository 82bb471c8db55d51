"""Everything a run needs from the data pipeline, built from `DataConfig` on every rank.

`build_train_data` loads the tokenizer, finds or builds the .bin/.idx pairs (the cached sample,
the user's `data.path`, or a blend of several: `data.blend`, `data.blend_per_split`), builds
megatron-core's train/valid/test datasets through `BlendedMegatronDatasetBuilder` (a
`GPTDataset` per pair, a `BlendedDataset` mixing them in the stated proportions), and wraps the
train split in this rank's `BatchLoader`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from stability.data.cache import cache_root, file_lock
from stability.data.config import SPLITS, Blend, DataConfig
from stability.data.indexed import indexed_exists, read_metadata, sample_dataset_prefix
from stability.data.loader import Batch, BatchLoader, check_batch_shape, eval_batches
from stability.data.sample import SAMPLE_TOKENIZER
from stability.data.tokenizer import HFTokenizer, Tokenizer, open_tokenizer, tokenizer_file
from stability.errors import ConfigError


@dataclass
class TrainData:
    """What training needs from the data pipeline.

    Attributes:
        tokenizer: The tokenizer of the dataset (its vocab size sizes the model).
        loader: This rank's training micro batches.
        train: The train-split dataset behind `loader` (a GPTDataset, or megatron-core's
            BlendedDataset of several).
        valid: The validation-split dataset (one epoch), or None when the split is empty.
        test: The test-split dataset (one epoch), or None when the split is empty.
        prefixes: The .bin/.idx prefixes the splits read, in order.
    """

    tokenizer: Tokenizer | HFTokenizer
    loader: BatchLoader
    train: GPTDataset | BlendedDataset
    valid: GPTDataset | BlendedDataset | None
    test: GPTDataset | BlendedDataset | None
    prefixes: list[Path]

    @property
    def prefix(self) -> Path:
        """The first (with one dataset, the only) .bin/.idx prefix."""
        return self.prefixes[0]

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


def load_tokenizer(cfg: DataConfig, default: str | Path | None = None) -> Tokenizer | HFTokenizer:
    """The configured tokenizer (a SentencePiece model or a tokenizer.json, see
    `open_tokenizer`); when `cfg.tokenizer` is None, `default`, else the shipped sample one."""
    path = cfg.tokenizer or default or SAMPLE_TOKENIZER
    allowed = "an existing SentencePiece .model file, tokenizer.json, or a folder holding one"
    if not tokenizer_file(path).is_file():
        raise ConfigError("data.tokenizer", cfg.tokenizer or str(path), allowed)
    try:
        return open_tokenizer(path)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(
            "data.tokenizer", cfg.tokenizer or str(path),
            f"a byte-fallback SentencePiece model or a tokenizer.json ({error})"
        ) from error


def check_prefix(key: str, value: str, tokenizer: Tokenizer | HFTokenizer) -> Path:
    """The checked .bin/.idx prefix ``value`` (named ``key``): the pair exists, and its sidecar,
    if any, names this tokenizer."""
    prefix = Path(value).expanduser()
    if not indexed_exists(prefix):
        raise ConfigError(
            key,
            value,
            "the prefix of an existing PREFIX.bin + PREFIX.idx pair "
            "(make one with python -m stability.data.preprocess)",
        )
    metadata = read_metadata(prefix)
    if metadata and metadata.get("tokenizer_sha256") != tokenizer.sha256:
        raise ConfigError(
            "data.tokenizer",
            str(getattr(tokenizer, "model_path", None)),
            f"the tokenizer {value} was built with (sha256 {metadata['tokenizer_sha256']}, "
            f"vocab {metadata['vocab_size']}); this one has sha256 {tokenizer.sha256}",
        )
    return prefix


def dataset_blends(
    cfg: DataConfig, tokenizer: Tokenizer | HFTokenizer
) -> tuple[Blend | None, list[Blend | None] | None]:
    """megatron-core's (blend, blend_per_split) to train on, with every prefix checked: the
    cached sample, the user's `data.path`, or their `data.blend` / `data.blend_per_split`."""
    if cfg.name == "sample":
        return ([str(sample_dataset_prefix(tokenizer, cache_root(cfg.cache_dir)))], None), None
    if cfg.name != "indexed":
        raise ConfigError("data.name", cfg.name, '"sample" or "indexed"')
    blend, per_split = cfg.blends()
    if blend is None and per_split is None:
        raise ConfigError("data.path", cfg.path,
                          'a .bin/.idx prefix (or data.blend) when data.name is "indexed"')

    def checked(b: Blend | None, key: str) -> Blend | None:
        if b is None:
            return None
        return [str(check_prefix(key, p, tokenizer)) for p in b[0]], b[1]

    if per_split is not None:
        return None, [checked(b, f"data.blend_per_split.{split}")
                      for split, b in zip(SPLITS, per_split)]
    return checked(blend, "data.blend" if cfg.blend else "data.path"), None


def _split_ranges(split: str) -> list[tuple[float, float] | None]:
    weights = [float(part) for part in split.split(",")]
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return convert_split_vector_to_split_matrix([w / total for w in weights])


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
    begin, end = _split_ranges(split)[0]
    if round(end * num_documents) - round(begin * num_documents) < 1:
        raise ConfigError(
            "data.split",
            split,
            f"a split giving training at least one of {num_documents} documents",
        )


def split_samples(prefix: str, split: tuple[float, float], seq_length: int) -> int:
    """Samples of ``seq_length`` (+1) tokens in one epoch of the documents of ``prefix`` that
    the split range ``split`` selects (megatron's rounding of document boundaries)."""
    dataset = IndexedDataset(prefix)
    documents = len(dataset.document_indices) - 1
    begin, end = (int(round(bound * documents)) for bound in split)
    first, last = dataset.document_indices[begin], dataset.document_indices[end]
    tokens = int(dataset.sequence_lengths[first:last].sum())
    return max(tokens - 1, 0) // seq_length


def blend_sizes(
    blend: Blend, ranges: list[tuple[float, float] | None], seq_length: int,
    train_samples: int | None, key: str
) -> tuple[Blend, list[int | None]]:
    """The blend with weights, and the samples to draw per split, for megatron-core.

    A blend without weights takes each dataset's training samples (or its samples, for a
    per-split blend) as its weight, so that it is drawn in proportion to its size and repeats,
    reshuffled, past an epoch. The training split draws ``train_samples``; a held-out split
    draws one epoch of the blend in the stated proportions: the most samples for which no
    dataset repeats (megatron needs a size for weighted splits).
    """
    prefixes, weights = blend
    counts = [[split_samples(p, r, seq_length) if r is not None else 0 for r in ranges]
              for p in prefixes]
    if weights is None:
        train = next(i for i, r in enumerate(ranges) if r is not None)
        weights = [float(c[train]) for c in counts]
        if min(weights) <= 0:
            empty = prefixes[weights.index(min(weights))]
            raise ConfigError(key, empty, "a dataset with at least one sample to train on")
    total = sum(weights)
    sizes: list[int | None] = []
    for i, split in enumerate(ranges):
        if split is None:
            sizes.append(0)  # not built; megatron wants a size wherever weights are given
        elif i == 0 and train_samples is not None:
            sizes.append(train_samples)
        else:
            empty = [p for p, c in zip(prefixes, counts) if c[i] == 0]
            if empty:
                raise ConfigError(key, empty[0],
                                  f"a dataset with samples in the {SPLITS[i]} split (blended "
                                  f"splits draw from every dataset; give {SPLITS[i]} weight 0 "
                                  f"in data.split)")
            sizes.append(int(min(c[i] * total / w for c, w in zip(counts, weights))))
    return (prefixes, weights), sizes


def build_gpt_datasets(
    blend: Blend | None,
    per_split: list[Blend | None] | None,
    tokenizer: Tokenizer | HFTokenizer,
    cfg: DataConfig,
    *,
    seed: int,
    train_samples: int,
) -> list[GPTDataset | BlendedDataset | None]:
    """Builds the train/valid/test datasets of a blend through megatron-core's
    BlendedMegatronDatasetBuilder (indices cached on disk): one GPTDataset for a single
    prefix, a BlendedDataset of GPTDatasets for several; per split with ``per_split``.

    Call it on every rank: under torch.distributed, megatron builds on rank 0 first and the
    other ranks wait at a barrier and then load the cached indices.
    """
    if cfg.seq_length < 1:
        raise ConfigError("data.seq_length", cfg.seq_length, "an integer >= 1")
    if train_samples < 1:
        raise ConfigError("train_samples", train_samples, "an integer >= 1")
    sizes: list[int | None] = [train_samples, None, None]
    if per_split is not None:
        prefixes = [p for b in per_split if b for p in b[0]]
        per_split = list(per_split)
        for i, b in enumerate(per_split):
            if b is not None and len(b[0]) > 1:
                per_split[i], split_sizes = blend_sizes(
                    b, [(0.0, 1.0) if j == i else None for j in range(3)], cfg.seq_length,
                    train_samples if i == 0 else None, f"data.blend_per_split.{SPLITS[i]}")
                sizes[i] = split_sizes[i]
        split = None
    else:
        prefixes = blend[0]
        for prefix in prefixes:
            _check_split(cfg.split, len(IndexedDataset(prefix).document_indices) - 1)
        if len(prefixes) > 1:
            blend, sizes = blend_sizes(blend, _split_ranges(cfg.split), cfg.seq_length,
                                       train_samples, "data.blend")
        split = cfg.split
    index_cache = cache_root(cfg.cache_dir) / "gpt-indices" / _file_version(prefixes)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=cfg.seq_length,
        blend=blend,
        blend_per_split=per_split,
        split=split,
        path_to_cache=str(index_cache),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        return builder.build()  # rank 0 holds the lock; megatron's barrier orders us after it
    # megatron writes its index files in place: one builder at a time per cache folder.
    with file_lock(index_cache.parent / f"{index_cache.name}.lock"), _rank_known():
        return builder.build()


@contextlib.contextmanager
def _rank_known() -> Iterator[None]:
    """megatron's BlendedDataset asks torch.distributed for the rank before it caches its
    indices (GPTDataset checks for a process group first); outside a run, a one-process group
    stands in while the datasets are built."""
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0,
                                         world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _file_version(prefixes: list[str]) -> str:
    """Names the current content of .bin/.idx pairs (paths, sizes, modification times).

    megatron keys its cached indices by the dataset path only; adding this key means that a
    pair rewritten in place (preprocess run again) never meets the indices of its old content.
    """
    stats = [Path(f"{prefix}{ext}").resolve() for prefix in prefixes for ext in (".bin", ".idx")]
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
    default_tokenizer: str | Path | None = None,
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
        default_tokenizer: The tokenizer when `cfg.tokenizer` is None (model.init_from's);
            None = the sample tokenizer.

    Raises:
        ConfigError: For a bad data setting, naming the key and the value.
    """
    check_batch_shape(global_batch_size, micro_batch_size, dp_rank, dp_size)
    tokenizer = load_tokenizer(cfg, default_tokenizer)
    blend, per_split = dataset_blends(cfg, tokenizer)
    train, valid, test = build_gpt_datasets(
        blend, per_split, tokenizer, cfg, seed=seed, train_samples=train_samples
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
    prefixes = blend[0] if blend else [p for b in per_split if b for p in b[0]]
    return TrainData(tokenizer, loader, train, valid, test, [Path(p) for p in prefixes])
