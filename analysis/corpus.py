"""The corpus's n-gram levels: the held-out loss of models that learn nothing but token
frequencies (unigram) or token pairs (bigram), in nats per token.

A run whose held-out loss is not clearly below the unigram level has learned nothing a count
table does not know, and any comparison of such runs measures whether they learn at all, not
whether they are stable (docs/findings.md). Every figure states both levels; a comparison is
``untestable`` unless the best runs of its arms beat the unigram level by a margin.

The split is the trainer's: documents in stored order, ``data.split`` weights (megatron's
``convert_split_vector_to_split_matrix`` rounding), the held-out documents the second part. Each
document is its tokens followed by EOD, as in the indexed dataset, and the first token of a
document follows an EOD. Smoothing: add-one for the unigram; Witten-Bell interpolation of the
bigram with that unigram (no parameter tuned on the held-out text).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Levels:
    """Held-out n-gram losses of a tokenizer on the sample corpus."""

    tokenizer: str
    vocab_size: int
    unigram: float
    """Held-out cross-entropy of the add-one unigram model (nats/token)."""
    bigram: float
    """Held-out cross-entropy of the Witten-Bell interpolated bigram model (nats/token)."""
    train_tokens: int
    heldout_tokens: int

    def to_json(self) -> dict:
        return asdict(self)


def split_bounds(num_documents: int, split: str = "969,30,1") -> list[tuple[int, int]]:
    """Document index ranges of the train, held-out and test parts (the trainer's rounding)."""
    weights = [float(w) for w in split.split(",")]
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    edges, acc = [0.0], 0.0
    for w in weights:
        acc += w / total
        edges.append(acc)
    return [(round(a * num_documents), round(b * num_documents))
            for a, b in zip(edges, edges[1:], strict=False)]


def cache_dir() -> Path:
    """Where computed levels are kept between processes: ``$STABILITY_CACHE``, else
    ``$XDG_CACHE_HOME/stability``, else ``~/.cache/stability``."""
    if os.environ.get("STABILITY_CACHE"):
        return Path(os.environ["STABILITY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stability"


def _levels_key(tokenizer_path: Path, split: str) -> str:
    """What the levels depend on: the corpus's and the tokenizer's bytes, the split, and the
    code that counts (so a change to the smoothing is never served from an old cache)."""
    from stability.data.sample import SAMPLE_CORPUS

    h = hashlib.sha256()
    code = inspect.getsource(ngram_losses) + inspect.getsource(split_bounds)
    for part in (SAMPLE_CORPUS.read_bytes(), tokenizer_path.read_bytes(), split.encode(),
                 code.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:20]


@functools.lru_cache(maxsize=4)
def sample_levels(tokenizer: str = "sample-2k", split: str = "969,30,1") -> Levels:
    """The n-gram levels of a shipped tokenizer (``data.tokenizer`` name) on the sample corpus.

    Counting takes ~5 s (the corpus is tokenized and every pair counted), so the result is kept
    in :func:`cache_dir` under a key of everything it depends on (:func:`_levels_key`);
    ``regenerate`` then redraws every figure in seconds. A cache that cannot be written is not an
    error.
    """
    from stability.data.tokenizer import tokenizer_file

    path = tokenizer_file(tokenizer)
    cached = cache_dir() / "levels" / f"{_levels_key(path, split)}.json"
    try:
        return Levels(**json.loads(cached.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    levels = compute_levels(tokenizer, split)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(levels.to_json()))
        os.replace(tmp, cached)
    except OSError:
        pass
    return levels


def compute_levels(tokenizer: str = "sample-2k", split: str = "969,30,1") -> Levels:
    """:func:`sample_levels` without the cache: tokenize the corpus and count."""
    from stability.data.sample import iter_sample_documents
    from stability.data.tokenizer import Tokenizer, tokenizer_file

    tok = Tokenizer(tokenizer_file(tokenizer))
    docs = [doc["text"] for doc in iter_sample_documents()]
    ids = [ids + [tok.eod] for ids in tok.encode_batch(docs)]
    (t0, t1), (h0, h1), _ = split_bounds(len(ids), split)
    unigram, bigram = ngram_losses(ids[t0:t1], ids[h0:h1], tok.vocab_size, tok.eod)
    return Levels(tokenizer, tok.vocab_size, unigram, bigram,
                  sum(map(len, ids[t0:t1])), sum(map(len, ids[h0:h1])))


def ngram_losses(train: list[list[int]], heldout: list[list[int]], vocab_size: int,
                 start: int) -> tuple[float, float]:
    """(unigram, bigram) held-out cross-entropy in nats per token.

    Every token of a held-out document is predicted; the context of a document's first token is
    ``start`` (EOD: the previous document's end).
    """
    uni: Counter = Counter()
    pairs: Counter = Counter()
    for doc in train:
        uni.update(doc)
        pairs.update(zip([start, *doc[:-1]], doc, strict=True))
    n = sum(uni.values())
    context: Counter = Counter()
    types: Counter = Counter()
    for (prev, _), count in pairs.items():
        context[prev] += count
        types[prev] += 1

    def p_uni(w: int) -> float:
        return (uni[w] + 1) / (n + vocab_size)

    nll_uni = nll_bi = 0.0
    count = 0
    for doc in heldout:
        for prev, w in zip([start, *doc[:-1]], doc, strict=True):
            pu = p_uni(w)
            c, t = context[prev], types[prev]
            pb = (pairs[(prev, w)] + t * pu) / (c + t) if c else pu
            nll_uni -= math.log(pu)
            nll_bi -= math.log(pb)
            count += 1
    return nll_uni / count, nll_bi / count
