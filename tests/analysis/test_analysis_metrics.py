"""Stability metrics (analysis.metrics), checked against hand computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import metrics as M
from analysis.runs import load_runs


def test_final_loss_mean_of_last_k() -> None:
    loss = [5.0, 4.0] + [3.0] * 19 + [4.0]  # one noisy last step
    assert M.final_loss(loss, k=20) == pytest.approx((19 * 3.0 + 4.0) / 20)
    assert M.final_loss(loss, k=1) == 4.0
    assert M.final_loss([3.0, 2.0], k=20) == 2.5  # shorter than k: all of it
    assert M.final_loss([3.0, math.nan, 2.0], k=20) == 2.5  # a skipped NaN step is left out
    assert M.final_loss([3.0, math.nan]) == math.inf  # ended non-finite
    assert math.isnan(M.final_loss([]))


def test_loss_at_init_and_best() -> None:
    assert M.loss_at_init([math.nan, 5.0, 4.0]) == 5.0
    assert M.loss_at_init([5.0], vocab_size=256) == pytest.approx(math.log(256))
    assert M.best_loss([5.0, math.inf, 2.0, 3.0]) == 2.0
    assert math.isnan(M.best_loss([math.nan]))


def test_is_diverged() -> None:
    assert not M.is_diverged([5.0, 3.0, 3.0])
    assert M.is_diverged([5.0, 3.0, math.nan, 3.0])  # any non-finite loss
    assert M.is_diverged([5.0, 3.0, 6.0, 6.0], k=2)  # ends above its init
    assert not M.is_diverged([5.0, 3.0, 6.0, 6.0], init=7.0, k=2)
    assert not M.is_diverged([])


def test_lr_sensitivity_hand_computed() -> None:
    # grid 1e-3, 1e-2, 1e-1; init 5: min(final, init) = [3, 2.5, 5] -> mean 3.5; best 2.5
    assert M.lr_sensitivity([3.0, 2.5, 6.0], 5.0) == pytest.approx(1.0)
    assert M.lr_sensitivity([3.0, 2.5, math.inf], [5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert M.lr_sensitivity([3.0, 2.5, math.nan], 5.0) == pytest.approx(1.0)  # missing = diverged
    assert M.lr_sensitivity([2.0, 2.0], 5.0) == 0.0
    assert math.isnan(M.lr_sensitivity([math.inf, math.nan], 5.0))


def test_max_stable_lr() -> None:
    assert M.max_stable_lr([1e-3, 1e-2, 1e-1], [False, False, True]) == 1e-2
    assert M.max_stable_lr([1e-3, 1e-2, 1e-1], [False, True, False]) == 1e-1  # largest stable
    assert math.isnan(M.max_stable_lr([1e-3], [True]))


def test_grid_metrics_on_sweep(sweep: Path) -> None:
    runs = load_runs(sweep).runs
    per_seed = M.grid_per_seed(runs).set_index("trainer.seed")
    # seed 0: finals 3, 2.5, 6 (init 5) -> 1.0; max stable 1e-2 (1e-1 ends above init)
    assert per_seed.loc[0, "lr_sensitivity"] == pytest.approx(1.0)
    assert per_seed.loc[0, "max_stable_lr"] == pytest.approx(1e-2)
    assert per_seed.loc[0, "best_lr"] == pytest.approx(1e-2)
    # seed 1: 1e-2 is incomplete (skipped), 1e-1 went NaN -> min = [3, 5]: 4 - 3 = 1.0
    assert per_seed.loc[1, "n_lrs"] == 2
    assert per_seed.loc[1, "lr_sensitivity"] == pytest.approx(1.0)
    assert per_seed.loc[1, "max_stable_lr"] == pytest.approx(1e-3)
    summary = M.grid_metrics(runs, by=["recipe"]).set_index("metric")
    assert summary.loc["lr_sensitivity", "mean"] == pytest.approx(1.0)
    assert summary.loc["lr_sensitivity", "n"] == 2
    assert summary.loc["max_stable_lr", "mean"] == pytest.approx(math.sqrt(1e-3 * 1e-2))
    assert summary.loc["max_stable_lr", "recipe"] == "gpt"


def test_grid_uses_the_held_out_loss_capped_at_the_unigram_level() -> None:
    """One seed, 3 LRs: held-out 4.0, 3.5, and 7.0 (above the unigram level 6.3: diverged);
    a second seed whose largest LR died before its evaluation (NaN, diverged)."""
    runs = pd.DataFrame({
        "optim.lr": [1e-3, 1e-2, 1e-1] * 2, "trainer.seed": [1, 1, 1, 2, 2, 2],
        "eval_loss": [4.0, 3.5, 7.0, 4.2, 3.6, math.nan], "unigram": [6.3] * 6,
        "final_loss": [4.1, 3.6, 7.2, 4.3, 3.7, math.inf], "loss_at_init": [7.6] * 6,
        "diverged": [False, False, True, False, False, True], "status": ["completed"] * 6})
    per = M.grid_per_seed(runs).set_index("trainer.seed")
    want = (4.0 + 3.5 + 6.3) / 3 - 3.5
    assert per.loc[1, "lr_sensitivity"] == pytest.approx(want)
    assert per.loc[2, "lr_sensitivity"] == pytest.approx((4.2 + 3.6 + 6.3) / 3 - 3.6)
    assert per.loc[1, "max_stable_lr"] == pytest.approx(1e-2)
    assert per.loc[1, "stable_censored"] == "" and per.loc[1, "best_eval_loss"] == 3.5
    assert bool(per.loc[1, "optimum_interior"])
    calm = runs.assign(eval_loss=[4.0, 3.5, 3.9] * 2, diverged=False)
    per = M.grid_per_seed(calm).set_index("trainer.seed")
    assert per.loc[1, "stable_censored"] == ">="  # nothing diverged: the onset is above


def test_a_run_a_spike_policy_stopped_counts_at_the_unigram_level_not_its_training_loss():
    """A rollback policy that gives up stops the run before its evaluation: its training loss
    (6.0, below the unigram level) must not stand in for a held-out loss it never had."""
    runs = pd.DataFrame({
        "eval_loss": [5.0, math.nan, math.nan], "unigram": [6.3] * 3,
        "final_loss": [5.1, 6.0, 6.1], "loss_at_init": [7.6] * 3,
        "diverged": [False, False, False], "status": ["completed", "stopped", "running"]})
    held, cap = M.held_out(runs)
    assert held.tolist()[:2] == [5.0, math.inf] and cap.tolist() == [6.3] * 3


def test_diverged_by_held_out_loss() -> None:
    assert M.is_diverged([7.0, 5.0], eval_loss=6.5, unigram=6.3)  # learned less than unigram
    assert not M.is_diverged([7.0, 9.0], eval_loss=6.0, unigram=6.3)
    assert M.is_diverged([7.0, math.nan], eval_loss=3.0, unigram=6.3)  # non-finite loss
    assert M.is_diverged([7.0, 5.0], eval_loss=math.inf, unigram=6.3)
    assert M.is_diverged([5.0, 6.0])  # without a held-out loss: final above the loss at init


def test_incidents_by_kind() -> None:
    events = [{"step": 10, "kind": "spike", "metric": "loss"},
              {"step": 12, "kind": "spike", "metric": "loss"},
              {"step": 11, "kind": "spike", "metric": "grad_norm"},
              {"step": 50, "kind": "leading", "metric": "attn_logit_max"},
              {"step": 99, "kind": "nonfinite", "metric": "loss"}]
    assert M.incidents_by_kind(events) == {"num_loss_spikes": 1, "num_grad_spikes": 1,
                                           "num_leading": 1, "num_nonfinite": 1}


def test_grid_requires_columns(sweep: Path) -> None:
    with pytest.raises(KeyError, match=r"data\.seed"):
        M.grid_per_seed(load_runs(sweep).runs, seed_col="data.seed")


def test_merge_incidents_and_rate() -> None:
    assert M.merge_incidents([60, 10, 11, 11, 30]) == [(10, 30), (60, 60)]
    assert M.merge_incidents([10, 11, 60], merge_gap=0) == [(10, 10), (11, 11), (60, 60)]
    assert M.merge_incidents([]) == []
    assert M.spike_rate(3, 1500) == pytest.approx(2.0)
    assert math.isnan(M.spike_rate(1, 0))


def _trend(n: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 3.0 + 2.0 * np.exp(-np.arange(n) / 50) + 0.01 * rng.standard_normal(n)


def test_loss_spike_steps() -> None:
    loss = _trend()
    assert not M.loss_spike_steps(loss).any()  # a falling, noisy curve has no spike
    loss[150] += 1.0
    loss[200:205] = math.nan
    spiky = M.loss_spike_steps(loss)
    assert np.flatnonzero(spiky).tolist() == [150, 200, 201, 202, 203, 204]
    assert M.merge_incidents(np.flatnonzero(spiky)) == [(150, 150), (200, 204)]


def test_spike_score() -> None:
    flat = 3.0 + 0.01 * np.random.default_rng(1).standard_normal(500)
    assert M.spike_score(flat, window=100) == 0.0
    flat[[300, 400]] += 1.0
    # 500 records, the first 100 lack history: 2 spikes among 400 evaluated
    assert M.spike_score(flat, window=100) == pytest.approx(2 / 400)
    assert M.spike_score(flat, window=100, min_periods=50) == pytest.approx(2 / 450)
    assert math.isnan(M.spike_score([1.0, 2.0], window=100))


def test_steps_to_recover() -> None:
    steps = np.arange(1, 11)
    loss = np.array([3.0, 3.0, 3.0, 9.0, 6.0, 4.0, 3.0, 2.9, 2.9, 2.9])
    # onset at step 4; level = mean of 3, 3, 3 = 3; back at or below 3 at step 7
    assert M.steps_to_recover(steps, loss, [4]).tolist() == [3.0]
    assert M.steps_to_recover(steps, loss, [8]).tolist() == [0.0]  # never left the level
    stuck = np.array([3.0, 3.0, 9.0, math.nan, 8.0])
    assert np.isnan(M.steps_to_recover(np.arange(5), stuck, [2])).all()
    assert np.isnan(M.steps_to_recover(steps, loss, [1])).all()  # nothing before the onset


def test_run_metrics(sweep: Path) -> None:
    data = load_runs(sweep)
    out = M.run_metrics(data).set_index("run_id")
    assert out.loc["5", "loss_spikes"] == 1  # the NaN tail is one incident
    assert out.loc["0", "loss_spikes"] == 0
    # run 2 events at 10 (and 11) and 60; the loss is flat at its level: recovered at once
    assert out.loc["2", "recover_steps_mean"] == 0.0
    assert out.loc["2", "unrecovered"] == 0
    by_loss = M.run_metrics(data, onsets="loss").set_index("run_id")
    assert by_loss.loc["5", "unrecovered"] == 1
    with pytest.raises(ValueError, match="onsets"):
        M.run_metrics(data, onsets="bogus")


def test_count_incidents_filters(sweep: Path) -> None:
    events = load_runs(sweep).events
    assert M.count_incidents(events).to_dict() == {"2": 2}
    assert M.count_incidents(events, detectors=["grad"]).to_dict() == {"2": 1}
    assert M.count_incidents(events, merge_gap=0).to_dict() == {"2": 3}
    assert M.count_incidents(events, kinds=["nonfinite"]).empty
