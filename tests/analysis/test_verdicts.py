"""analysis.verdicts: the rules, and how often each says `reproduced` when nothing differs.

The simulated false-positive rates are checked against what they must be in closed form (one
paired t-test at level alpha says yes alpha of the time; independent parts multiply; Fisher's
rate is a finite sum over the tables), and against the rule itself applied to random data
(`paired` and `combine` called as the figures call them).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis import verdicts as V


def test_testable_needs_every_arm_one_nat_below_the_unigram_level():
    assert V.testable([5.0, 4.2], unigram=6.33)
    assert not V.testable([5.0, 5.4], unigram=6.33)  # 0.93 nats below: not enough
    assert not V.testable([5.0, math.inf], unigram=6.33)
    assert not V.testable([], unigram=6.33)


def test_paired_decides_by_a_one_sided_t_test():
    d = [0.3, 0.5, 0.4]
    t = V.paired(d)
    want = stats.ttest_1samp(d, 0.0, alternative="greater").pvalue
    assert t.p == pytest.approx(want) and t.verdict == V.REPRODUCED
    assert t.detail == "3/3 seeds in the claimed direction"
    assert V.paired([0.3, -0.5, 0.4]).verdict == V.NOT_REPRODUCED
    assert V.paired([-0.1, -0.2, -0.3]).p > 0.95  # the wrong direction is never reproduced
    assert V.paired(d, is_testable=False).verdict == V.UNTESTABLE


def test_counts_uses_fishers_exact_test_and_3_of_3_against_0_of_3_is_the_strongest_result():
    t = V.counts(3, 3, 0, 3)
    assert t.p == pytest.approx(1 / 20) and t.verdict == V.REPRODUCED
    assert V.counts(3, 3, 1, 3).verdict == V.NOT_REPRODUCED
    assert V.counts(5, 5, 0, 5).p == pytest.approx(1 / 252)
    assert V.counts(0, 3, 3, 3).p == pytest.approx(1.0)


def test_combine_leaves_untestable_parts_out():
    r, n, u = (V.Test(v, 0.0, 3) for v in (V.REPRODUCED, V.NOT_REPRODUCED, V.UNTESTABLE))
    assert V.combine([r, r]) == V.REPRODUCED
    assert V.combine([r, n]) == V.PARTLY
    assert V.combine([n, u]) == V.NOT_REPRODUCED
    assert V.combine([r, u]) == V.REPRODUCED
    assert V.combine([u, u]) == V.UNTESTABLE


def test_holm_adjusts_step_down_and_keeps_nan():
    assert V.holm([0.01, 0.04, math.nan, 0.03]) == pytest.approx(
        [0.03, 0.06, math.nan, 0.06], nan_ok=True)


@pytest.mark.parametrize("n", [3, 5])
def test_one_paired_test_says_reproduced_alpha_of_the_time(n):
    rate = V.false_positive_rate([n], sims=40000)
    assert rate["reproduced"] == pytest.approx(V.ALPHA, abs=0.005)
    assert rate["partly_or_better"] == rate["reproduced"]


def test_two_parts_multiply_and_partly_is_one_minus_both_failing():
    rate = V.false_positive_rate([3, 5], sims=40000)
    assert rate["reproduced"] == pytest.approx(V.ALPHA**2, abs=0.002)
    assert rate["partly_or_better"] == pytest.approx(1 - (1 - V.ALPHA) ** 2, abs=0.006)


@pytest.mark.parametrize("n_a,n_b", [(3, 3), (5, 5), (15, 15)])
def test_fishers_rate_is_the_sum_over_the_tables_it_rejects(n_a, n_b):
    """Both arms diverge with probability 1/2: the exact rate is the binomial mass of the
    tables with p <= alpha."""
    exact = sum(stats.binom.pmf(a, n_a, 0.5) * stats.binom.pmf(b, n_b, 0.5)
                for a in range(n_a + 1) for b in range(n_b + 1)
                if V.counts(a, n_a, b, n_b).verdict == V.REPRODUCED)
    rate = V.false_positive_rate([], counts_runs=[(n_a, n_b)], sims=40000)
    assert rate["reproduced"] == pytest.approx(exact, abs=0.004)
    assert rate["reproduced"] <= V.ALPHA
    if (n_a, n_b) == (3, 3):
        assert exact == pytest.approx(1 / 64)  # only 3/3 against 0/3


def test_holm_keeps_six_comparisons_under_alpha_where_unadjusted_tests_do_not():
    adjusted = V.false_positive_rate([3] * 6, adjust=True, sims=40000)
    raw = V.false_positive_rate([3] * 6, sims=40000)
    assert adjusted["partly_or_better"] <= V.ALPHA + 0.005
    assert raw["partly_or_better"] == pytest.approx(1 - (1 - V.ALPHA) ** 6, abs=0.01)


def test_the_rule_itself_on_random_data_agrees_with_the_simulated_rate():
    """`paired` + `combine` as a two-part figure calls them, on 4,000 draws with no effect."""
    rng = np.random.default_rng(7)
    verdicts = [V.combine([V.paired(rng.standard_normal(3)), V.paired(rng.standard_normal(5))])
                for _ in range(4000)]
    yes = np.mean([v == V.REPRODUCED for v in verdicts])
    some = np.mean([v in (V.REPRODUCED, V.PARTLY) for v in verdicts])
    rate = V.false_positive_rate([3, 5])
    assert yes == pytest.approx(rate["reproduced"], abs=0.003)
    assert some == pytest.approx(rate["partly_or_better"], abs=0.015)
