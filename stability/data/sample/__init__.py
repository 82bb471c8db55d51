"""The embedded sample corpus (English and Japanese) and its tokenizer, shipped as files.

See PROVENANCE.md in this folder for sources, licences and cleaning; `build_sample.py` makes
these files.
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Iterator
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent
SAMPLE_CORPUS = SAMPLE_DIR / "corpus.jsonl.xz"
"""One JSON object per line: text, lang ("en" | "ja"), source, license."""
SAMPLE_TOKENIZER = SAMPLE_DIR / "tokenizer.model"
"""SentencePiece BPE model (byte fallback) trained on the corpus: 8192 entries."""
SAMPLE_TOKENIZERS = {"sample": SAMPLE_TOKENIZER, "sample-2k": SAMPLE_DIR / "tokenizer-2k.model"}
"""The shipped tokenizers by the name ``data.tokenizer`` takes: the 8k one, and a 2048-entry
one trained the same way, for CPU studies (docs/findings.md: at d=128 an 8k output layer is
most of a small model's FLOPs, and most of its entries are seen a handful of times)."""


def iter_sample_documents() -> Iterator[dict[str, str]]:
    """Yields the sample corpus documents in their stored order."""
    with lzma.open(SAMPLE_CORPUS, "rt", encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)
