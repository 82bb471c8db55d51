"""Each detector on synthetic series: fires on its spike, silent on a falling curve and noise."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
from detector_series import ROOT, falling_loss, heavy_tailed_loss, run

from stability.detectors import (
    DEFAULT_DETECTORS,
    REGISTRY,
    Event,
    allowed_params,
    build_detectors,
)
from stability.errors import ConfigError

LOSS_DETECTORS = ["loss_spike", "kill_loss_spike", "megatron_spiky", "olmo_spike"]


def spiked(rows, at, factor, length=1, key="loss"):
    out = [dict(r) for r in rows]
    for r in out[at : at + length]:
        r[key] = r[key] * factor
    return out


def test_registry_and_defaults():
    assert set(DEFAULT_DETECTORS) <= set(REGISTRY)
    for name in REGISTRY:
        (det,) = build_detectors([name])
        assert det.name == name and det.requires
        json.dumps(det.state_dict())  # JSON-serialisable from the start


def test_build_rejects_bad_names_and_params():
    with pytest.raises(ConfigError, match="'nope'.*one of .*loss_spike"):
        build_detectors(["nope"])
    with pytest.raises(ConfigError, match="at most once"):
        build_detectors(["loss_spike", "loss_spike"])
    with pytest.raises(ConfigError, match="'windw'.*one of .*window"):
        build_detectors(["loss_spike"], {"loss_spike": {"windw": 3}})
    with pytest.raises(ConfigError, match="chosen detectors"):
        build_detectors(["loss_spike"], {"nonfinite": {}})
    (det,) = build_detectors(["attn_logit_growth"], {"attn_logit_growth": {"horizon": 4}})
    assert det.horizon == 4 and "transform" not in allowed_params("attn_logit_growth")


def test_loss_spike_fires_on_a_jump_during_the_steep_fall():
    rows = falling_loss(400)
    # step 60: the loss is still falling ~1%/step; a rolling median would sit ~15% too high
    events = run(build_detectors(["loss_spike"])[0], spiked(rows, 60, 1.3))
    assert [(e.step, e.kind, e.severity) for e in events] == [(60, "spike", "warn")]
    assert events[0].threshold < events[0].value and events[0].score > 6


def test_loss_spike_fires_on_a_sustained_jump_within_two_steps():
    rows = spiked(falling_loss(500), 300, 1.05, length=50)  # 5 sigmas of a 1% noise, lasting
    events = run(build_detectors(["loss_spike"])[0], rows)
    assert len(events) == 1 and 300 <= events[0].step <= 302  # one event for 50 rows


def test_loss_spike_thresholds_scale_with_the_noise():
    # a quiet curve (0.3% noise): a 4% jump is 13 sigmas, a spike
    quiet = spiked(falling_loss(600, noise=0.003), 400, 1.04)
    assert [e.step for e in run(build_detectors(["loss_spike"])[0], quiet)] == [400]
    # a noisy curve (5% noise): a 20% hard batch is 4 sigmas, not a spike; nor are two of
    # them in three rows
    noisy = spiked(spiked(falling_loss(600, noise=0.05), 400, 1.2), 402, 1.2)
    assert run(build_detectors(["loss_spike"])[0], noisy) == []
    # the old fixed floors (20% single, 12% sustained) can be asked for explicitly
    (floored,) = build_detectors(["loss_spike"], {"loss_spike": {"floor_large": 0.2}})
    assert run(floored, quiet) == []


def test_loss_spike_is_quiet_on_heavy_tailed_noise():
    # Laplace noise: a row 7 sigmas out every ~20k rows; a lone one is noise, not a spike
    events = [e for seed in range(24)
              for e in run(build_detectors(["loss_spike"])[0], heavy_tailed_loss(3000, seed))]
    assert events == []


def test_loss_spike_confirms_a_moderately_large_row_on_the_next_one():
    base = falling_loss(500, noise=0.005)
    # ~9 sigmas on one row, back to the trend on the next: a hard batch
    assert run(build_detectors(["loss_spike"])[0], spiked(base, 300, 1.05)) == []
    # the same row, and the next still 3 sigmas up: a spike, flagged one row later
    rows = spiked(spiked(base, 300, 1.05), 301, 1.015)
    (ev,) = run(build_detectors(["loss_spike"])[0], rows)
    assert ev.step == 301 and "confirmed" in ev.message and ev.score > 7
    # the next row only ~2.5 sigmas up: what a noise row next to a hard batch does
    assert run(build_detectors(["loss_spike"])[0], spiked(spiked(base, 300, 1.05), 301, 1.012)
               ) == []
    # ~14 sigmas on one row: at once, whatever comes next
    assert [e.step for e in run(build_detectors(["loss_spike"])[0], spiked(base, 300, 1.07))
            ] == [300]


def test_loss_spike_confirms_a_large_row_on_the_rising_row_before_it():
    base = falling_loss(500, noise=0.005)
    # a spike that builds over two rows: ~4 sigmas, then ~9: flagged on the second row (it
    # waited for a third row before, and missed a spike whose third row was back down)
    rows = spiked(spiked(base, 299, 1.02), 300, 1.05)
    (ev,) = run(build_detectors(["loss_spike"])[0], rows)
    assert ev.step == 300 and "after a rising row" in ev.message
    # the row before only ~2 sigmas up is noise next to a hard batch
    assert run(build_detectors(["loss_spike"])[0], spiked(spiked(base, 299, 1.01), 300, 1.05)
               ) == []


def test_loss_spike_sees_a_spike_from_the_twelfth_row():
    # a study run (spike_no_more, GPT, LR 1e-2): 6.86 -> 8.00 -> 9.63 -> 6.80 at steps 21-24,
    # and a Llama2 z-loss run's one-row +79% at step 14; neither was flagged before
    runs = ROOT / "benchmarks/detectors/real/studies/runs"
    for name, step in [("spike_no_more-gpt-study-03452b0a5cad", 23),
                       ("z_loss-llama2-study-9370d916789c", 14)]:
        rows = [json.loads(line) for line in (runs / f"{name}.jsonl").read_text().splitlines()]
        assert [e.step for e in run(build_detectors(["loss_spike"])[0], rows)] == [step]


def test_loss_spike_flags_a_jump_before_its_trend_exists():
    # a post-LN study run (LR 1e-3, no warm-up): 6.70 -> 13.77 -> 6.78 at step 10, before the
    # trend has its 12 rows; nothing flagged it before
    runs = ROOT / "benchmarks/detectors/real/studies/runs"
    path = runs / "norm_placement-gpt-study-43c41f6431ac.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    (ev,) = run(build_detectors(["loss_spike"])[0], rows)
    assert ev.step == 10 and "early" in ev.message
    # +25% over the rows before is not one; a run of high rows is one event
    base = falling_loss(40, noise=0.005)
    assert run(build_detectors(["loss_spike"])[0], spiked(base, 6, 1.25)) == []
    assert [e.step for e in run(build_detectors(["loss_spike"])[0], spiked(base, 6, 1.6, 2))
            ] == [6]
    # a level that stays 60% up: one event, and the rows enter the baseline after hold_max
    # rows, so the trend detector does not stay in its warm-up for the rest of the run
    det = build_detectors(["loss_spike"])[0]
    assert [e.step for e in run(det, spiked(base, 6, 1.6, 34))] == [6]
    assert len(det.state_dict()["state"]["hist"]) == 40 - 5


def test_loss_spike_sustained_rule_waits_for_the_noise():
    # a pre-LN study run (LR 3e-3, no warm-up) whose fall flattens at step 13-18: 5 sigmas of
    # the first rows' in-sample scale on three rows, a false "sustained" alarm at step 18 once
    # the rule started at row 12; the rule now waits for 16 out-of-sample residuals
    runs = ROOT / "benchmarks/detectors/real/studies-heldout/runs"
    path = runs / "norm_placement-gpt-study-7b0cd41db5ba.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert run(build_detectors(["loss_spike"])[0], rows) == []


def test_loss_spike_ignores_a_single_hard_batch():
    rows = spiked(falling_loss(500), 300, 1.04)  # 4 sigmas of a 1% noise
    assert run(build_detectors(["loss_spike"])[0], rows) == []


def test_loss_rebound_catches_an_early_blow_up_before_the_loss_passes_init():
    rows = falling_loss(120, noise=0.01)  # from ~10.8 to ~6.5 by step 25
    start = rows[25]["loss"]
    for i, r in enumerate(rows[25:60]):  # climbs back to 1.5x the loss at init in 35 steps
        r["loss"] = start * math.exp(i / 34 * math.log(1.5 * rows[0]["loss"] / start))
    cross = next(r["step"] for r in rows[25:] if r["loss"] > rows[0]["loss"])
    events = run(build_detectors(["loss_rebound"])[0], rows)
    assert len(events) == 1 and 25 < events[0].step < cross
    assert "of the way from its low" in events[0].message
    # the trend detector has not got its history that early in some runs: rows from step 0
    # without a trend detector still warn; and a normal fall never does
    assert run(build_detectors(["loss_rebound"])[0], falling_loss(120, seed=3)) == []


def test_loss_rebound_flags_a_run_unstable_from_the_start_within_two_rows():
    # no warm-up at a high LR: the loss jumps above its value at init from the third row
    # (a real Llama2 run at LR 0.1), before 12 rows have measured the noise
    loss = [9.03, 8.92, 10.8, 10.7, 10.5, 10.3, 9.63, 9.56, 8.76, 9.36, 9.33, 9.12, 8.35, 8.34]
    loss += [8.2 - 0.02 * i for i in range(30)]
    rows = [{"step": i + 1, "loss": v} for i, v in enumerate(loss)]
    events = run(build_detectors(["loss_rebound"])[0], rows)
    # two rows above it are enough (a study run at LR 0.3 climbed 7.6 -> 8.7 -> 9.3 and was
    # back at 8.3 on the third row); three were needed before, one row later
    assert [e.step for e in events] == [4] and "above its value at init" in events[0].message
    # one hard batch above it is not one
    lone = [9.03, 8.92, 10.8, 8.8, 8.7, 8.6] + [8.5 - 0.02 * i for i in range(30)]
    assert run(build_detectors(["loss_rebound"])[0],
               [{"step": i + 1, "loss": v} for i, v in enumerate(lone)]) == []
    # a noisy first stretch that stays around the loss at init is not one
    calm = [9.0, 8.72, 8.59, 8.97, 8.47, 9.11, 8.18, 8.26, 8.25, 8.6, 8.42, 8.61, 8.33, 8.22]
    calm += [8.1 - 0.02 * i for i in range(30)]
    assert run(build_detectors(["loss_rebound"])[0],
               [{"step": i + 1, "loss": v} for i, v in enumerate(calm)]) == []


def test_update_ratio_above_one_fires_on_the_first_row():
    rows = falling_loss(40)
    rows[0]["update_ratio_max"] = 19.0  # the first Adam step moved the weights 19x their norm
    events = run(build_detectors(["update_ratio_growth"])[0], rows)
    assert [(e.step, e.kind) for e in events] == [(0, "leading")]


@pytest.mark.parametrize("name", sorted({*LOSS_DETECTORS, "grad_norm_spike", *DEFAULT_DETECTORS}))
def test_silent_on_a_clean_falling_curve(name):
    for seed in range(3):
        assert run(build_detectors([name])[0], falling_loss(1200, seed=seed)) == []


@pytest.mark.parametrize("name", [*LOSS_DETECTORS, "grad_norm_spike"])
def test_silent_on_stationary_noise(name):
    rng = random.Random(1)
    rows = [
        {
            "step": t,
            "loss": 2.5 * (1 + rng.gauss(0, 0.02)),
            "grad_norm": math.exp(rng.gauss(0, 0.1)),
        }
        for t in range(1500)
    ]
    assert run(build_detectors([name])[0], rows) == []


@pytest.mark.parametrize(
    ("name", "factor", "first"),
    [
        ("loss_spike", 1.5, 2200),
        ("olmo_spike", 1.5, 2200),
        ("megatron_spiky", 50.0, 2200),  # 10x the max of the first 100 (~10.8) = 108: x50
        ("kill_loss_spike", 2.5, 2204),  # fifth consecutive outlier
    ],
)
def test_loss_baselines_fire_on_their_spikes(name, factor, first):
    rows = spiked(falling_loss(2300), 2200, factor, length=10)
    events = run(build_detectors([name])[0], rows)
    assert [e.step for e in events if e.metric == "loss"] == [first]


def test_olmo_window_std_hides_a_spike_while_the_curve_falls():
    rows = spiked(falling_loss(1300), 1100, 1.5, length=10)  # window 100-1100 spans the fall
    assert [e for e in run(build_detectors(["olmo_spike"])[0], rows) if e.metric == "loss"] == []
    assert [e.step for e in run(build_detectors(["loss_spike"])[0], rows)] == [1100]


def test_kill_loss_spike_is_blind_to_a_short_spike():
    rows = spiked(falling_loss(1300), 1100, 2.5, length=4)  # 4 outliers = patience: no event
    assert run(build_detectors(["kill_loss_spike"])[0], rows) == []


def test_olmo_spike_score_counts_every_spike_row():
    (det,) = build_detectors(["olmo_spike"], {"olmo_spike": {"window": 100}})
    rows = spiked(falling_loss(600), 500, 1.5, length=5)
    events = run(det, rows)
    assert [e.step for e in events if e.metric == "loss"] == [500]
    assert det.spike_score("loss") == pytest.approx(5 / 500)
    assert "spike score" in events[0].message


def test_grad_norm_spike_fires_once_per_incident():
    rows = spiked(falling_loss(800), 500, 8.0, length=3, key="grad_norm")
    events = run(build_detectors(["grad_norm_spike"])[0], rows)
    assert [(e.step, e.metric) for e in events] == [(500, "grad_norm")]


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("attn_logit_growth", "attn_logit_max"),
        ("update_ratio_growth", "update_ratio_max"),
        ("logsumexp_drift", "logsumexp_mean"),
    ],
)
def test_leading_detectors_fire_on_fast_growth_before_the_loss_moves(name, key):
    rows = falling_loss(600)
    for i, r in enumerate(rows[400:420]):  # exponential growth, x8 (or +15 nats) in 20 steps
        grow = (math.exp(i / 6.7) - 1) / (math.exp(20 / 6.7) - 1)
        r[key] = r[key] + 15 * grow if key == "logsumexp_mean" else r[key] * 8**grow
    rows = spiked(rows, 420, 1.5, length=30)  # the loss blows up after the growth
    lead = run(build_detectors([name])[0], rows)
    loss = run(build_detectors(["loss_spike"])[0], rows)
    assert lead and lead[0].kind == "leading" and 405 <= lead[0].step < loss[0].step == 420


def test_attention_logits_high_from_the_first_steps_are_no_alarm():
    # a run that trains, at a high LR: its max attention logit grows x10^5 in 20 steps and
    # stays in the thousands (the level depends on the init scale and the LR, not on health)
    rows = falling_loss(300)
    for r in rows:
        r["attn_logit_max"] = 0.01 * 5e5 ** min(1.0, r["step"] / 20) * (1 + 0.02 * (r["step"] % 3))
    assert run(build_detectors(["attn_logit_growth"])[0], rows) == []
    # an absolute ceiling can still be asked for
    (det,) = build_detectors(["attn_logit_growth"], {"attn_logit_growth": {"ceiling": 1000}})
    cross = next(r["step"] for r in rows if r["attn_logit_max"] >= 1000)
    assert [(e.step, e.threshold) for e in run(det, rows)] == [(cross, 1000)] and cross < 20


OLD_ATTN = {"attn_logit_growth": {"smooth": 1, "min_value": None, "mute_while": None,
                                   "floor": math.log(1.5)}}
"""The attention-logit rule before it learned from the study runs (tests show it fired)."""


def test_attention_logit_growth_is_silent_on_what_healthy_runs_do():
    rng = random.Random(4)
    # (a) a max over sampled rows that drops for a row or three to ~0.05 and is back at ~6
    # (a post-LN study run at LR 3e-4: the old rule fired 4 times on it)
    flat = falling_loss(400)[200:]
    for r in flat:
        r["attn_logit_max"] = 6.0 * math.exp(rng.gauss(0, 0.1))
    for start in range(220, 600, 37):
        for r in flat[start - 200 : start - 200 + rng.randint(1, 3)]:
            r["attn_logit_max"] = 0.05 * math.exp(rng.gauss(0, 0.5))
    # (b) attention forming while the loss falls fast: x20 in 30 steps of warm-up
    early = falling_loss(200)
    for r in early:
        r["attn_logit_max"] = 0.5 * 20 ** min(1.0, max(0.0, (r["step"] - 20) / 30))
    # (c) growth among values too small to matter: 1e-3 -> 0.8
    tiny = falling_loss(400)[200:]
    for r in tiny:
        r["attn_logit_max"] = 1e-3 * 800 ** min(1.0, max(0.0, (r["step"] - 300) / 20))
    for rows in (flat, early, tiny):
        assert run(build_detectors(["attn_logit_growth"])[0], rows) == []
        assert run(build_detectors(["attn_logit_growth"], OLD_ATTN)[0], rows) != []


def test_attention_logit_growth_on_a_calm_study_run():
    # the dev family's calm post-LN run (LR 3e-4, no warm-up): four old alarms, none now
    runs = ROOT / "benchmarks/detectors/real/studies/runs"
    path = runs / "norm_placement-gpt-study-5d55158009b9.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(run(build_detectors(["attn_logit_growth"], OLD_ATTN)[0], rows)) == 4
    assert run(build_detectors(["attn_logit_growth"])[0], rows) == []


def test_leading_jump_fires_on_one_row():
    rows = spiked(falling_loss(300), 200, 50.0, length=20, key="update_ratio_max")
    events = run(build_detectors(["update_ratio_growth"])[0], rows)
    assert [e.step for e in events] == [200]


def test_missing_keys_and_gaps_in_steps_are_fine():
    rows = falling_loss(3000)[::5]  # logged every 5 steps
    for r in rows[::7]:
        del r["attn_logit_max"]
    dets = build_detectors(list(REGISTRY))
    assert [e for d in dets for e in run(d, rows)] == []
    rows = spiked(rows, 300, 1.5, length=10)  # step 1500, sustained
    events = run(build_detectors(["loss_spike"])[0], rows)
    assert [e.step for e in events] == [1500]
    assert run(build_detectors(["loss_spike"])[0], [{"step": 1}, {"step": 2, "lr": 1.0}]) == []


def test_event_json_round_trip():
    ev = Event(3, "nonfinite", "loss", math.nan, math.nan, math.inf, "error", "nonfinite")
    row = json.loads(json.dumps(ev.to_json()))
    assert list(row) == [
        "step", "detector", "metric", "value", "threshold", "score", "severity", "kind",
        "action", "message",
    ]  # fmt: skip
    back = Event.from_json(row)
    assert back.step == 3 and math.isnan(back.value) and back.score == math.inf
    assert ev.with_action("stop").action == "stop" and ev.action == ""


def test_detectors_never_import_torch():
    code = "import sys, stability.detectors, stability.detect; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
