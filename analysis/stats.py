"""Spread of a metric over seeds: mean and a confidence interval that keeps its coverage.

A claim holds only if it holds across seeds (DESIGN.md), so every metric is reported as
``mean [lo, hi] (n seeds)``, with the seeds themselves in the figures' JSON. The interval is
Student's t (``mean +- t(n-1) s / sqrt(n)``): with 3 seeds a bootstrap interval covers the mean
only ~67-70% of the time, a t-interval 95% (for normal spread; ``tests/analysis`` simulates
both).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

Values = Sequence[float] | np.ndarray | pd.Series


@dataclass(frozen=True)
class SeedStat:
    """A metric over seeds: mean, confidence interval ``[lo, hi]`` and the number of seeds ``n``."""

    mean: float
    lo: float
    hi: float
    n: int


def seed_ci(
    values: Values,
    *,
    confidence: float = 0.95,
    method: str = "t",
    n_resamples: int = 9999,
    seed: int = 0,
    log: bool = False,
) -> SeedStat:
    """Mean over seeds with a confidence interval: Student's t (default) or a bootstrap
    (``scipy.stats.bootstrap``).

    Non-finite values are dropped (``n`` counts the rest). n=0 gives all NaN; n=1 gives the
    value with ``lo = hi = NaN`` (no interval from one seed); identical values give a zero-width
    interval. If BCa cannot be computed (tiny or degenerate samples) the percentile interval
    is used.

    Args:
        values: One value per seed.
        confidence: Confidence level of the interval.
        method: ``"t"``, or a bootstrap: ``"BCa"``, ``"percentile"`` or ``"basic"``.
        n_resamples: Bootstrap resamples.
        seed: Seed of the resampling, so numbers are reproducible.
        log: Work on ``log10`` of the (positive) values: geometric mean and CI, for LRs.
    """
    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    if log:
        a = np.log10(a[a > 0])
    n = int(a.size)
    if n == 0:
        return SeedStat(math.nan, math.nan, math.nan, 0)
    mean = float(a.mean())
    if n == 1:
        lo = hi = math.nan
    elif np.all(a == a[0]):
        lo = hi = mean
    elif method == "t":
        lo, hi = t_interval(a, confidence)
    else:
        lo, hi = _bootstrap(a, confidence, method, n_resamples, seed)
        if not (np.isfinite(lo) and np.isfinite(hi)) and method != "percentile":
            lo, hi = _bootstrap(a, confidence, "percentile", n_resamples, seed)
    if log:
        mean, lo, hi = (10.0**x for x in (mean, lo, hi))
    return SeedStat(mean, float(lo), float(hi), n)


def t_interval(a: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean of ``a`` (at least 2 values)."""
    from scipy import stats  # lazily: scipy.stats takes seconds to import

    half = stats.t.ppf(0.5 + confidence / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size)
    return float(a.mean() - half), float(a.mean() + half)


def _bootstrap(
    a: np.ndarray, confidence: float, method: str, n_resamples: int, seed: int
) -> tuple[float, float]:
    from scipy import stats  # lazily: scipy.stats takes seconds to import

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(
            (a,),
            np.mean,
            confidence_level=confidence,
            method=method,
            n_resamples=n_resamples,
            rng=seed,
        )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def over_seeds(
    table: pd.DataFrame, value: str, by: Sequence[str] = (), **ci: object
) -> pd.DataFrame:
    """Aggregate one column over seeds: a row per group of ``by`` with mean, lo, hi, n.

    Args:
        table: One row per seed (per run, or per seed of a grid from
            :func:`analysis.metrics.grid_per_seed`).
        value: Column to aggregate.
        by: Columns that define a group (e.g. ``["recipe", "optim.lr"]``); empty: one group.
        **ci: Passed to :func:`seed_ci` (``confidence``, ``method``, ``log``, ...).
    """
    by = list(by)
    groups = table.groupby(by, dropna=False, sort=True) if by else [((), table)]
    rows = []
    for key, group in groups:
        stat = seed_ci(group[value], **ci)  # type: ignore[arg-type]
        rows.append({**dict(zip(by, key, strict=True)), **stat.__dict__})
    return pd.DataFrame(rows, columns=[*by, "mean", "lo", "hi", "n"])
