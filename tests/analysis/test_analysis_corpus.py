"""analysis.corpus: the held-out split is the trainer's (megatron-core's rounding), and the
n-gram levels are the smoothed models' cross-entropies."""

from __future__ import annotations

import json
import math

import pytest

from analysis import corpus


@pytest.mark.parametrize("split", ["969,30,1", "98,2,0", "1,1,1", "90,10"])
@pytest.mark.parametrize("documents", [7, 1000, 5_432, 12_345])
def test_the_split_is_megatron_cores(split, documents):
    """The document ranges megatron-core's dataset builder cuts for ``data.split``."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    want = []
    for part in matrix:  # blended_megatron_dataset_builder: int(round(bound * num_elements))
        if part is None:
            want.append(None)
        else:
            want.append((int(round(part[0] * documents)), int(round(part[1] * documents))))
    got = corpus.split_bounds(documents, split)
    for w, g in zip(want, got, strict=True):
        assert w is None and g[0] == g[1] or w == g, (split, documents, want, got)


def test_ngram_losses_by_hand():
    """Train "a b" + EOD twice; held out "a a" + EOD. Vocabulary 3 (EOD=0, a=1, b=2)."""
    train, held = [[1, 2, 0], [1, 2, 0]], [[1, 1, 0]]
    uni, bi = corpus.ngram_losses(train, held, vocab_size=3, start=0)
    p = {w: (c + 1) / (6 + 3) for w, c in {0: 2, 1: 2, 2: 2}.items()}  # add-one
    assert uni == pytest.approx(-(math.log(p[1]) * 2 + math.log(p[0])) / 3)
    # Witten-Bell: after EOD (seen twice, one type) "a" was always next; after "a" always "b";
    # after "a" the held-out "a" is unseen: t * p_uni / (c + t).
    p_a_after_eod = (2 + 1 * p[1]) / (2 + 1)
    p_a_after_a = (0 + 1 * p[1]) / (2 + 1)
    p_eod_after_a = (0 + 1 * p[0]) / (2 + 1)
    want = -(math.log(p_a_after_eod) + math.log(p_a_after_a) + math.log(p_eod_after_a)) / 3
    assert bi == pytest.approx(want)


def test_the_shipped_2k_tokenizer_levels(tmp_path, monkeypatch):
    """The calibration's levels (docs/findings.md): unigram ~6.33, bigram ~3.79 nats/token;
    counted once, then served from the on-disk cache with the same numbers, and recounted when
    the cached file is unreadable."""
    monkeypatch.setenv("STABILITY_CACHE", str(tmp_path))
    corpus.sample_levels.cache_clear()
    levels = corpus.sample_levels("sample-2k")
    (cached,) = (tmp_path / "levels").glob("*.json")
    corpus.sample_levels.cache_clear()
    cached.write_text(json.dumps({**levels.to_json(), "unigram": 1.5}))
    assert corpus.sample_levels("sample-2k").unigram == 1.5  # the cache is what is read
    corpus.sample_levels.cache_clear()
    cached.write_text("{not json")
    assert corpus.sample_levels("sample-2k") == levels
    corpus.sample_levels.cache_clear()
    assert levels.vocab_size == 2048
    assert 6.2 < levels.unigram < 6.45 and 3.6 < levels.bigram < 3.95
    assert levels.bigram < levels.unigram < math.log(levels.vocab_size)
