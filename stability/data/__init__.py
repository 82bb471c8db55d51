"""Text -> tokenizer -> megatron indexed dataset (.bin/.idx) -> deterministic batches.

Importing this package is cheap; megatron-core is imported on the first `build_train_data`.
See docs/data.md for the corpus, the cache and the batch order.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stability.data.config import DataConfig
from stability.data.tokenizer import HFTokenizer, Tokenizer

if TYPE_CHECKING:
    from stability.data.train_data import TrainData

__all__ = ["DataConfig", "HFTokenizer", "Tokenizer", "TrainData", "build_train_data"]


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
    """Tokenizer, datasets and this rank's batch loader; see `stability.data.train_data`."""
    from stability.data.train_data import build_train_data as build

    return build(
        cfg,
        seed=seed,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        train_samples=train_samples,
        default_tokenizer=default_tokenizer,
    )


def __getattr__(name: str):
    # `from stability.data import TrainData` works without importing megatron up front.
    if name == "TrainData":
        from stability.data.train_data import TrainData

        return TrainData
    raise AttributeError(f"module 'stability.data' has no attribute {name!r}")
