"""The data section of the run configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stability.errors import ConfigError, one_of, positive

DATA_NAMES = ("sample", "indexed")
SPLITS = ("train", "valid", "test")

Blend = tuple[list[str], list[float] | None]
"""megatron-core's blend: dataset prefixes and their weights (None: in proportion to size)."""


def parse_blend(key: str, items: list[Any]) -> Blend:
    """A megatron-style blend list as (prefixes, weights): ``[w1, prefix1, w2, prefix2, ...]``
    (weights > 0, normalized by megatron) or ``[prefix1, prefix2, ...]`` (each dataset in
    proportion to its size); ConfigError naming ``key`` otherwise."""
    allowed = ("a list [w1, prefix1, w2, prefix2, ...] with weights > 0, or [prefix1, ...]")
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(key, items, allowed)
    if all(isinstance(item, str) for item in items):
        return [str(item) for item in items], None
    pairs = list(zip(items[::2], items[1::2]))
    if len(items) % 2 or not all(
            isinstance(w, int | float) and not isinstance(w, bool) and w > 0
            and isinstance(p, str) for w, p in pairs):
        raise ConfigError(key, items, allowed)
    return [p for _, p in pairs], [float(w) for w, _ in pairs]


@dataclass
class BlendPerSplit:
    """``data.blend_per_split``: each split's own blend, each like ``data.blend``, instead of
    one blend (or path) cut by ``data.split``. Unset splits are empty."""

    train: list[Any] | None = None
    """The training blend (required when any split is set)."""
    valid: list[Any] | None = None
    """The validation blend; None = no validation data."""
    test: list[Any] | None = None
    """The test blend; None = no test data."""

    def __bool__(self) -> bool:
        return any(getattr(self, split) for split in SPLITS)


@dataclass
class DataConfig:
    """Which tokens the model trains on, and how they are cut into sequences."""

    name: str = "sample"
    """"sample": the embedded English/Japanese corpus, tokenized into the cache on first use;
    "indexed": a megatron .bin/.idx pair made by `python -m stability.data.preprocess`."""

    path: str | None = None
    """Prefix of the .bin/.idx pair (without extension) when `name` is "indexed"."""

    blend: list[Any] | None = None
    """Several .bin/.idx prefixes mixed, megatron-style, when `name` is "indexed" (instead of
    `path`): [w1, prefix1, w2, prefix2, ...] draws each sample from dataset i with probability
    w_i / sum(w) (through megatron-core's BlendedDataset); [prefix1, prefix2, ...] mixes them in
    proportion to their sizes. `split` splits each dataset."""

    blend_per_split: BlendPerSplit = field(default_factory=BlendPerSplit)
    """A blend per split instead of `path`/`blend` and `split` (see `BlendPerSplit`)."""

    tokenizer: str | None = None
    """A shipped tokenizer by name: "sample" (8192 entries; None is the same) or "sample-2k"
    (2048), both in stability/data/sample/; a SentencePiece .model file, a Hugging Face
    tokenizer.json, or a folder holding one (tokenizer.json first); with model.init_from=hf:DIR
    and None, DIR's tokenizer. Must be the tokenizer the indexed dataset was built with."""

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
        sources = [k for k in ("path", "blend", "blend_per_split") if getattr(self, k)]
        if self.name == "indexed" and not sources:
            raise ConfigError("data.path", self.path,
                              'a .bin/.idx prefix (or data.blend) when data.name is "indexed"')
        if len(sources) > 1:
            raise ConfigError(f"data.{sources[1]}", getattr(self, sources[1]),
                              f"null when data.{sources[0]} is set (one source of data)")
        if self.name != "indexed" and (self.blend or self.blend_per_split):
            raise ConfigError("data.name", self.name, '"indexed" with data.blend')
        self.blends()
        positive("data.seq_length", self.seq_length)
        try:
            weights = [float(part) for part in self.split.split(",")]
        except ValueError:
            weights = []
        if not 1 <= len(weights) <= 3 or min(weights) < 0 or weights[0] <= 0:
            raise ConfigError("data.split", self.split,
                              'one to three weights >= 0 like "969,30,1", train > 0')
        positive("data.num_workers", self.num_workers, zero_ok=True)

    def blends(self) -> tuple[Blend | None, list[Blend | None] | None]:
        """(blend, blend_per_split) as megatron-core takes them: the single `path` or `blend`
        for all splits, or one blend per split (None for a split without data); ConfigError
        for a malformed one."""
        if self.blend_per_split:
            per_split = self.blend_per_split
            if not per_split.train:
                raise ConfigError("data.blend_per_split.train", per_split.train,
                                  "a blend like data.blend when data.blend_per_split is set")
            return None, [parse_blend(f"data.blend_per_split.{split}", getattr(per_split, split))
                          if getattr(per_split, split) else None for split in SPLITS]
        if self.blend:
            return parse_blend("data.blend", self.blend), None
        return ([self.path], None) if self.path else None, None

    def prefixes(self) -> list[tuple[str, str]]:
        """(key, prefix) of every .bin/.idx prefix this section names, in order."""
        blend, per_split = self.blends()
        if per_split is not None:
            return [(f"data.blend_per_split.{split}", prefix)
                    for split, b in zip(SPLITS, per_split) if b for prefix in b[0]]
        if blend is None:
            return []
        return [("data.blend" if self.blend else "data.path", prefix) for prefix in blend[0]]

    def check_files(self) -> None:
        """Raise ConfigError when the tokenizer or a dataset named here does not exist (a
        look at the file system only: nothing is read or built)."""
        if self.tokenizer:
            from stability.data.tokenizer import tokenizer_file

            if not tokenizer_file(self.tokenizer).is_file():
                raise ConfigError("data.tokenizer", self.tokenizer,
                                  "an existing SentencePiece .model file, tokenizer.json, or a "
                                  "folder holding one")
        for key, prefix in self.prefixes():
            path = Path(prefix).expanduser()
            if not all(Path(f"{path}{ext}").is_file() for ext in (".bin", ".idx")):
                raise ConfigError(key, prefix,
                                  "the prefix of an existing PREFIX.bin + PREFIX.idx pair "
                                  "(make one with python -m stability.data.preprocess)")
