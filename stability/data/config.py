"""The data section of the run configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Which tokens the model trains on, and how they are cut into sequences."""

    name: str = "sample"
    """"sample": the embedded English/Japanese corpus, tokenized into the cache on first use;
    "indexed": a megatron .bin/.idx pair made by `python -m stability.data.preprocess`."""

    path: str | None = None
    """Prefix of the .bin/.idx pair (without extension) when `name` is "indexed"."""

    tokenizer: str | None = None
    """SentencePiece .model file; None uses the sample tokenizer shipped in
    stability/data/sample/. Must be the tokenizer the indexed dataset was built with."""

    seq_length: int = 128
    """Tokens per training sequence (each sample reads seq_length + 1 tokens: inputs and
    next-token labels)."""

    split: str = "969,30,1"
    """Train/valid/test weights over documents, megatron-style; documents are assigned in
    stored order, so the last 3.1% of documents are held out by default."""

    cache_dir: str | None = None
    """Where tokenized data and sample indices are cached; None is $STABILITY_CACHE, else
    ~/.cache/stability."""

    num_workers: int = 0
    """Background threads that read and collate the next micro batches while the model
    computes; 0 reads each micro batch when it is asked for (enough for the sample corpus)."""
