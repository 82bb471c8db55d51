"""Verdicts on published claims, and how often each rule says yes when there is no effect.

A comparison first has to be *testable*: at a scale where the models do not learn, every recipe
looks stable because none moves, so a comparison is ``untestable at this scale`` unless the best
run of each of its arms reaches a held-out loss at least :data:`MARGIN_NATS` below the corpus's
unigram level (``analysis.corpus``).

A testable comparison is paired by seed (same seed, same data order and initial draws in both
arms) and decided by a one-sided paired t-test in the claimed direction, at level
:data:`ALPHA`: ``reproduced`` when p < ALPHA, else ``not reproduced``. Outcomes that are counts
(runs that diverged) use Fisher's exact test instead (p <= ALPHA: an exact test's p-values are
discrete, and 3/3 against 0/3 diverged is p = 1/20). A figure with several comparisons (parts)
is ``reproduced`` when all are, ``not reproduced`` when none is, else ``partly``; comparisons
that are untestable are left out, and a figure with no testable comparison is ``untestable``.

:func:`false_positive_rate` simulates each rule under no effect, so every verdict comes with
the probability that its rule would have said it anyway (``docs/findings.md`` prints them).
Families of many comparisons (the ablation) report Holm-adjusted p-values too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

REPRODUCED = "reproduced"
PARTLY = "partly"
NOT_REPRODUCED = "not reproduced"
UNTESTABLE = "untestable at this scale"

ALPHA = 0.05
"""One-sided significance level of a comparison."""
MARGIN_NATS = 1.0
"""How far below the unigram level the best run of every arm must be for a comparison to be
testable (nats per token, held-out)."""


@dataclass(frozen=True)
class Test:
    """The outcome of one comparison."""

    verdict: str
    p: float
    """One-sided p-value in the claimed direction (NaN when untestable)."""
    n: int
    """Seeds (paired) or runs (counts) behind it."""
    detail: str = ""
    runs_per_arm: tuple[int, int] | None = None
    """Runs of the two arms of a count comparison (None: a paired one)."""

    def to_json(self) -> dict:
        return asdict(self)


def testable(best_losses: Sequence[float], unigram: float,
             margin: float = MARGIN_NATS) -> bool:
    """Does every arm's best held-out loss beat the unigram level by ``margin``?"""
    return bool(best_losses) and all(
        math.isfinite(b) and b <= unigram - margin for b in best_losses)


def paired_t(diffs: Sequence[float]) -> float:
    """One-sided p-value of ``mean(diffs) > 0`` (paired t-test; NaN for fewer than 2)."""
    from scipy import stats

    d = np.asarray([x for x in diffs if math.isfinite(x)], dtype=float)
    if d.size < 2:
        return math.nan
    if np.all(d == d[0]):
        return 0.0 if d[0] > 0 else 1.0
    return float(stats.ttest_1samp(d, 0.0, alternative="greater").pvalue)


def paired(diffs: Sequence[float], *, is_testable: bool = True) -> Test:
    """A paired comparison: ``diffs`` per seed, positive in the claimed direction."""
    d = [x for x in diffs if math.isfinite(x)]
    if not is_testable:
        return Test(UNTESTABLE, math.nan, len(d), "an arm's best run is not 1 nat below "
                                                  "the unigram level")
    p = paired_t(d)
    verdict = REPRODUCED if p < ALPHA else NOT_REPRODUCED
    wins = sum(x > 0 for x in d)
    return Test(verdict, p, len(d), f"{wins}/{len(d)} seeds in the claimed direction")


def counts(k_claimed_worse: int, n_worse: int, k_claimed_better: int, n_better: int, *,
           is_testable: bool = True) -> Test:
    """Runs that diverged (``k`` of ``n``) in the arm claimed worse against the arm claimed
    better: Fisher's exact test, one-sided (more divergences in the arm claimed worse)."""
    from scipy import stats

    if not is_testable:
        return Test(UNTESTABLE, math.nan, n_worse + n_better, "an arm's best run is not 1 nat "
                    "below the unigram level", (n_worse, n_better))
    table = [[k_claimed_worse, n_worse - k_claimed_worse],
             [k_claimed_better, n_better - k_claimed_better]]
    p = float(stats.fisher_exact(table, alternative="greater").pvalue)
    # <= for an exact test: 3/3 against 0/3 is p = 1/20 exactly, the strongest 3-seed result.
    return Test(REPRODUCED if p <= ALPHA + 1e-9 else NOT_REPRODUCED, p, n_worse + n_better,
                f"{k_claimed_worse}/{n_worse} vs {k_claimed_better}/{n_better} diverged",
                (n_worse, n_better))


def combine(tests: Sequence[Test]) -> str:
    """The figure's verdict from its comparisons (untestable ones left out)."""
    verdicts = [t.verdict for t in tests if t.verdict != UNTESTABLE]
    if not verdicts:
        return UNTESTABLE
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if all(v == NOT_REPRODUCED for v in verdicts):
        return NOT_REPRODUCED
    return PARTLY


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN)."""
    finite = [(p, i) for i, p in enumerate(pvalues) if math.isfinite(p)]
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        out[i] = running
    return out


def false_positive_rate(seeds: Sequence[int], *, counts_runs: Sequence[tuple[int, int]] = (),
                        adjust: bool = False, sims: int = 20000, seed: int = 0
                        ) -> dict[str, float]:
    """How often the figure's rule says ``reproduced`` (and ``partly`` or better) when no arm
    differs: each paired comparison draws its per-seed differences from N(0, 1) (``seeds``: the
    seeds of each paired comparison), each count comparison draws both arms' divergences from one
    Bernoulli(1/2) (``counts_runs``: the runs of its two arms; 1/2 is the worst case of an exact
    test's rate). ``adjust``: the rule decides on Holm-adjusted p-values (:func:`holm`)."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    columns = []
    for n in seeds:
        d = rng.standard_normal((sims, n))
        t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
        columns.append(stats.t.sf(t, n - 1))
    for n_a, n_b in counts_runs:
        k_a = rng.binomial(n_a, 0.5, sims)
        k_b = rng.binomial(n_b, 0.5, sims)
        cache: dict[tuple[int, int], float] = {}  # few distinct tables: Fisher once for each
        for a, b in set(zip(k_a.tolist(), k_b.tolist(), strict=True)):
            cache[a, b] = stats.fisher_exact([[a, n_a - a], [b, n_b - b]],
                                             alternative="greater").pvalue
        # an exact test's p-values are compared with <= (counts): shift them by the tolerance
        columns.append(np.array([cache[a, b] for a, b in zip(k_a, k_b, strict=True)]) - 1e-9)
    if not columns:
        return {"reproduced": math.nan, "partly_or_better": math.nan}
    p = np.stack(columns, axis=1)
    if adjust:  # Holm step-down, row by row
        order = np.argsort(p, axis=1)
        ranked = np.take_along_axis(p, order, axis=1) * (p.shape[1] - np.arange(p.shape[1]))
        adjusted = np.minimum(np.maximum.accumulate(ranked, axis=1), 1.0)
        p = np.empty_like(adjusted)
        np.put_along_axis(p, order, adjusted, axis=1)
    yes = p < ALPHA
    return {"reproduced": float(yes.all(axis=1).mean()),
            "partly_or_better": float(yes.any(axis=1).mean())}
