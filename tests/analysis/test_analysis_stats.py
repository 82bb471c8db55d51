"""Spread over seeds (analysis.stats): t-intervals that keep their coverage at 3 seeds, bootstrap
intervals that do not, and small samples."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.stats import over_seeds, seed_ci


def test_seed_ci_is_the_t_interval() -> None:
    from scipy import stats

    values = [2.31, 2.45, 2.38, 2.52, 2.29]
    stat = seed_ci(values)
    half = stats.t.ppf(0.975, 4) * np.std(values, ddof=1) / math.sqrt(5)
    assert stat.n == 5 and stat.mean == pytest.approx(np.mean(values))
    assert (stat.lo, stat.hi) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    pct = seed_ci(values, method="percentile", confidence=0.9)
    assert min(values) <= pct.lo < pct.mean < pct.hi <= max(values)


def test_t_interval_keeps_its_coverage_at_3_seeds_and_the_bootstrap_does_not() -> None:
    """Normal seeds, 3 at a time: the t-interval covers the true mean ~95% of the time, a
    percentile bootstrap far less (what the earlier figures used)."""
    rng = np.random.default_rng(0)
    draws = rng.normal(1.0, 0.3, size=(400, 3))
    t_cover = np.mean([(s := seed_ci(d)).lo <= 1.0 <= s.hi for d in draws])
    boot_cover = np.mean([(s := seed_ci(d, method="percentile", n_resamples=999)).lo <= 1.0
                          <= s.hi for d in draws])
    assert 0.92 <= t_cover <= 0.98
    assert boot_cover < 0.82  # 0.76 here


def test_seed_ci_small_samples() -> None:
    one = seed_ci([2.5])
    assert (one.mean, one.n) == (2.5, 1) and math.isnan(one.lo) and math.isnan(one.hi)
    two = seed_ci([2.0, 3.0])  # t(1) = 12.7: wide, as two seeds are
    assert two.n == 2 and two.lo < 2.0 - 5 and two.hi > 3.0 + 5
    same = seed_ci([2.0, 2.0, 2.0])
    assert (same.lo, same.mean, same.hi) == (2.0, 2.0, 2.0)
    none = seed_ci([math.nan, math.inf])
    assert none.n == 0 and math.isnan(none.mean)


def test_seed_ci_log_is_geometric() -> None:
    stat = seed_ci([1e-3, 1e-2, 1e-1], log=True)
    assert stat.mean == pytest.approx(1e-2)
    lin = seed_ci([-3.0, -2.0, -1.0])
    assert stat.lo == pytest.approx(10**lin.lo) and stat.hi == pytest.approx(10**lin.hi)


def test_over_seeds_groups() -> None:
    table = pd.DataFrame(
        {"recipe": ["gpt", "gpt", "gpt", "llama2"], "final_loss": [3.0, 3.2, 3.1, 2.5]}
    )
    out = over_seeds(table, "final_loss", by=["recipe"]).set_index("recipe")
    assert out.loc["gpt", "n"] == 3 and out.loc["gpt", "mean"] == pytest.approx(3.1)
    assert out.loc["gpt", "lo"] <= 3.1 <= out.loc["gpt", "hi"]
    assert out.loc["llama2", "n"] == 1 and math.isnan(out.loc["llama2", "lo"])
    assert over_seeds(table, "final_loss")["n"].tolist() == [4]
