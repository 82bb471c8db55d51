"""The data section of the run configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stability.errors import ConfigError, one_of, positive

DATA_NAMES = ("sample", "indexed")


@dataclass
class DataConfig:
    """Which tokens the model trains on, and how they are cut into sequences."""

    name: str = "sample"
    """"sample": the embedded English/Japanese corpus, tokenized into the cache on first use;
    "indexed": a megatron .bin/.idx pair made by `python -m stability.data.preprocess`."""

    path: str | None = None
    """Prefix of the .bin/.idx pair (without extension) when `name` is "indexed"."""

    tokenizer: str | None = None
    """A shipped tokenizer by name: "sample" (8192 entries; None is the same) or "sample-2k"
    (2048), both in stability/data/sample/; or a SentencePiece .model file. Must be the
    tokenizer the indexed dataset was built with."""

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

    def validate(self) -> None:
        """Raise ConfigError on the first bad value of this section (no file is read)."""
        one_of("data.name", self.name, DATA_NAMES)
        if self.name == "indexed" and not self.path:
            raise ConfigError("data.path", self.path,
                              'a .bin/.idx prefix when data.name is "indexed"')
        positive("data.seq_length", self.seq_length)
        try:
            weights = [float(part) for part in self.split.split(",")]
        except ValueError:
            weights = []
        if not 1 <= len(weights) <= 3 or min(weights) < 0 or weights[0] <= 0:
            raise ConfigError("data.split", self.split,
                              'one to three weights >= 0 like "969,30,1", train > 0')
        positive("data.num_workers", self.num_workers, zero_ok=True)

    def check_files(self) -> None:
        """Raise ConfigError when the tokenizer or the dataset named here does not exist (a
        look at the file system only: nothing is read or built)."""
        from stability.data.sample import tokenizer_path

        if self.tokenizer and not tokenizer_path(self.tokenizer).is_file():
            raise ConfigError("data.tokenizer", self.tokenizer,
                              "an existing SentencePiece .model file")
        if self.name == "indexed":
            prefix = Path(self.path).expanduser()
            if not all(Path(f"{prefix}{ext}").is_file() for ext in (".bin", ".idx")):
                raise ConfigError("data.path", self.path,
                                  "the prefix of an existing PREFIX.bin + PREFIX.idx pair "
                                  "(make one with python -m stability.data.preprocess)")
