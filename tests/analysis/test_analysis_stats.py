"""Spread over seeds (analysis.stats): bootstrap CIs and small samples."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.stats import over_seeds, seed_ci


def test_seed_ci_contains_mean() -> None:
    values = [2.31, 2.45, 2.38, 2.52, 2.29]
    stat = seed_ci(values)
    assert stat.n == 5 and stat.mean == pytest.approx(np.mean(values))
    assert stat.lo < stat.mean < stat.hi
    assert min(values) <= stat.lo and stat.hi <= max(values)
    pct = seed_ci(values, method="percentile", confidence=0.9)
    assert pct.lo < pct.mean < pct.hi


def test_seed_ci_small_samples() -> None:
    one = seed_ci([2.5])
    assert (one.mean, one.n) == (2.5, 1) and math.isnan(one.lo) and math.isnan(one.hi)
    two = seed_ci([2.0, 3.0])
    assert two.n == 2 and two.lo <= two.mean <= two.hi
    assert two.lo >= 2.0 and two.hi <= 3.0
    same = seed_ci([2.0, 2.0, 2.0])
    assert (same.lo, same.mean, same.hi) == (2.0, 2.0, 2.0)
    none = seed_ci([math.nan, math.inf])
    assert none.n == 0 and math.isnan(none.mean)


def test_seed_ci_log_is_geometric() -> None:
    stat = seed_ci([1e-3, 1e-1], log=True)
    assert stat.mean == pytest.approx(1e-2)
    assert stat.lo == pytest.approx(1e-3) and stat.hi == pytest.approx(1e-1)


def test_over_seeds_groups() -> None:
    table = pd.DataFrame(
        {"recipe": ["gpt", "gpt", "gpt", "llama2"], "final_loss": [3.0, 3.2, 3.1, 2.5]}
    )
    out = over_seeds(table, "final_loss", by=["recipe"]).set_index("recipe")
    assert out.loc["gpt", "n"] == 3 and out.loc["gpt", "mean"] == pytest.approx(3.1)
    assert out.loc["gpt", "lo"] <= 3.1 <= out.loc["gpt", "hi"]
    assert out.loc["llama2", "n"] == 1 and math.isnan(out.loc["llama2", "lo"])
    assert over_seeds(table, "final_loss")["n"].tolist() == [4]
