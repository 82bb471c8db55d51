"""Tokenized documents in megatron-core's indexed format (.bin/.idx), and the cached sample.

Each document becomes one sequence: its token ids followed by the end-of-document id. A small
`PREFIX.meta.json` sidecar records which tokenizer made the pair, so a loader can refuse a
mismatched tokenizer instead of training on garbage ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from stability.data.cache import build_once
from stability.data.sample import SAMPLE_CORPUS, iter_sample_documents
from stability.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
"""Bump when the way documents become tokens changes, so cached samples are rebuilt."""


def metadata_path(prefix: str | Path) -> Path:
    """The sidecar `PREFIX.meta.json` written next to `PREFIX.bin` and `PREFIX.idx`."""
    return Path(f"{prefix}.meta.json")


def indexed_exists(prefix: str | Path) -> bool:
    """True when both `PREFIX.bin` and `PREFIX.idx` exist."""
    return IndexedDataset.exists(str(prefix))


def write_indexed_dataset(
    token_lists: Iterable[list[int]],
    prefix: str | Path,
    tokenizer: Tokenizer,
    extra_metadata: dict[str, object] | None = None,
) -> dict[str, object]:
    """Writes documents (token ids without EOD) to PREFIX.bin, PREFIX.idx, PREFIX.meta.json.

    Args:
        token_lists: One list of token ids per document, in order; EOD is appended here.
        prefix: Output path without extension; its folder must exist.
        tokenizer: The tokenizer that produced the ids (recorded in the sidecar).
        extra_metadata: More fields for the sidecar (e.g. the input files).

    Returns:
        The sidecar's content: documents, tokens, tokenizer sha256 and vocab size, ...
    """
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(get_bin_path(str(prefix)), dtype=dtype)
    documents = tokens = 0
    for ids in token_lists:
        array = numpy.empty(len(ids) + 1, dtype=numpy.int64)
        array[:-1] = ids
        array[-1] = tokenizer.eod
        builder.add_document(array, [array.size])
        documents += 1
        tokens += array.size
    builder.finalize(get_idx_path(str(prefix)))
    metadata = {
        "format_version": FORMAT_VERSION,
        "documents": documents,
        "tokens": tokens,
        "dtype": numpy.dtype(dtype).name,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
        **(extra_metadata or {}),
    }
    metadata_path(prefix).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return metadata


def read_metadata(prefix: str | Path) -> dict[str, object] | None:
    """Returns the sidecar of `prefix`, or None for a pair made by other tools."""
    path = metadata_path(prefix)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def sample_cache_key(tokenizer: Tokenizer) -> str:
    """A content hash of the sample corpus, the tokenizer and FORMAT_VERSION (16 hex digits)."""
    digest = hashlib.sha256(f"format={FORMAT_VERSION};tokenizer={tokenizer.sha256};".encode())
    digest.update(SAMPLE_CORPUS.read_bytes())
    return digest.hexdigest()[:16]


def sample_dataset_prefix(tokenizer: Tokenizer, cache_dir: Path) -> Path:
    """Returns the prefix of the tokenized sample corpus, building it on first use.

    The build takes a few seconds and is safe to call from several processes at once (see
    `stability.data.cache.build_once`); its folder name changes whenever the corpus, the
    tokenizer or FORMAT_VERSION changes, so stale data is never reused.
    """
    target = cache_dir / f"sample-{sample_cache_key(tokenizer)}"

    def build(folder: Path) -> None:
        texts = [doc["text"] for doc in iter_sample_documents()]
        write_indexed_dataset(
            tokenizer.encode_batch(texts), folder / "sample", tokenizer, {"source": "sample"}
        )

    return build_once(target, build) / "sample"
