"""State round trips: a detector restored mid-stream continues exactly; NaN at the first row."""

from __future__ import annotations

import json
import math

import pytest
from detector_series import falling_loss, run

from benchmarks.detectors.traces import make_trace
from stability.detectors import DEFAULT_DETECTORS, REGISTRY, DetectorSuite, build_detectors

# one trace with a bit of everything: spikes, NaN, a precursor, noise bursts, hard batches
TRACES = [make_trace(seed, "spike") for seed in (3, 6, 18)]


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("trace", TRACES, ids=lambda t: t.name)
def test_resume_mid_stream_gives_the_same_events(name, trace):
    rows = trace.rows
    params = {"olmo_spike": {"window": 200}} if name == "olmo_spike" else None
    (whole,) = build_detectors([name], params)
    expected = [e.to_json() for e in run(whole, rows)]
    cuts = [len(rows) // 7, len(rows) // 3, len(rows) // 2 + 11]
    (det,) = build_detectors([name], params)
    got, start = [], 0
    for cut in [*cuts, len(rows)]:
        got += [e.to_json() for e in run(det, rows[start:cut])]
        state = json.loads(json.dumps(det.state_dict()))  # through JSON, as a checkpoint
        (det,) = build_detectors([name], params)
        det.load_state_dict(state)
        start = cut
    assert json.dumps(got) == json.dumps(expected)  # NaN-safe equality


def test_suite_state_and_mismatch():
    rows = TRACES[0].rows
    suite = DetectorSuite.from_names(["nonfinite", "loss_spike"])
    half = len(rows) // 2
    first = [e for r in rows[:half] for e in suite.update(r["step"], r)]
    state = json.loads(json.dumps(suite.state_dict()))
    resumed = DetectorSuite.from_names(["nonfinite", "loss_spike", "attn_logit_growth"])
    resumed.load_state_dict(state)  # a detector added on resume starts fresh
    rest = [e for r in rows[half:] for e in resumed.update(r["step"], r)]
    ref = DetectorSuite.from_names(["nonfinite", "loss_spike"])
    want = [e for r in rows for e in ref.update(r["step"], r)]
    assert [e.step for e in first + rest if e.detector != "attn_logit_growth"] == [
        e.step for e in want
    ]
    with pytest.raises(ValueError, match="cannot be loaded"):
        build_detectors(["nonfinite"])[0].load_state_dict(state["detectors"]["loss_spike"])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("key", ["loss", "grad_norm"])
def test_nonfinite_fires_at_the_first_bad_row(bad, key):
    rows = falling_loss(50)
    for r in rows[30:35]:
        r[key] = bad
    (det,) = build_detectors(["nonfinite"])
    events = run(det, rows)
    assert [(e.step, e.metric, e.kind, e.severity) for e in events] == [
        (30, key, "nonfinite", "error")
    ]
    # it fires again on a second incident, even on the very first row of a run
    assert [e.step for e in run(det, [{"step": 50, key: bad}, {"step": 51, key: 1.0}])] == [50]
    (fresh,) = build_detectors(["nonfinite"])
    assert [e.step for e in run(fresh, [{"step": 1, key: bad}])] == [1]


def test_other_detectors_skip_nonfinite_rows():
    rows = falling_loss(400)
    for r in rows[200:203]:
        r["loss"] = math.nan
        r["grad_norm"] = math.inf
    for name in REGISTRY:
        if name != "nonfinite":
            assert run(build_detectors([name])[0], rows) == [], name


def rollback_rows(spike: bool, lr_scale: float = 1.0, start: int = 1, stop: int = 71):
    """A tiny run's rows around an LR spike at step 50: the update ratio is x100 in the spike
    row, the loss jumps in the next one (the update of step 50 shows in the loss of step 51)."""
    rows = falling_loss(stop)
    for r in rows:
        r["update_ratio_max"] *= lr_scale
    if spike:
        rows[50]["update_ratio_max"] *= 100
        for r in rows[51:53]:
            r["loss"] *= 1.5
    return [r for r in rows if start <= r["step"] < stop]


def test_rollback_restores_the_checkpoint_state_and_refeeds_without_a_false_alert():
    # live run: rows 1..52 (spike at 50, loss event at 51), checkpoint at step 40
    live = DetectorSuite.from_names(DEFAULT_DETECTORS)
    saved = None
    events = []
    for r in rollback_rows(spike=True, stop=53):
        events += live.update(r["step"], r)
        if r["step"] == 40:
            saved = json.loads(json.dumps(live.state_dict()))  # what the checkpoint holds
    assert [(e.step, e.detector) for e in events][:2] == [
        (50, "update_ratio_growth"), (51, "loss_spike")]
    # rollback: restore the checkpoint's state, feed the replayed steps 41..70 (no fault)
    live.load_state_dict(saved)
    after = [e for r in rollback_rows(spike=False, start=41) for e in live.update(r["step"], r)]
    assert after == []  # no alert on the normal values of step 50 and after
    # and the same as a run that never spiked: the state round trip is exact
    clean = DetectorSuite.from_names(DEFAULT_DETECTORS)
    for r in rollback_rows(spike=False, stop=41):
        clean.update(r["step"], r)
    assert json.dumps(clean.state_dict()) == json.dumps(saved)


def test_steps_going_backwards_without_a_restore_raise_no_false_alert():
    # a loop that forgot to restore the detectors: the replayed steps 41..70 arrive after 52
    suite = DetectorSuite.from_names(DEFAULT_DETECTORS)
    first = [e for r in rollback_rows(spike=True, stop=53) for e in suite.update(r["step"], r)]
    assert first
    replay = [e for r in rollback_rows(spike=False, start=41) for e in suite.update(r["step"], r)]
    assert replay == []


def test_an_lr_restored_after_a_rollback_is_a_real_jump():
    # The live report, explained: after a rollback the loop's scheduler runs ahead (megatron's
    # OptimizerParamScheduler.load_state_dict adds the checkpoint's step count to its own), so
    # in a short run the LR is min_lr (1e-5) from step 41 and the update ratio falls ~100x. A
    # replayed lr_spike fault at step 50 (x100: 1e-3, an ordinary LR) then gives an ordinary
    # looking ratio (0.0084, where the first spike gave 0.87) that is a genuine x100 jump
    # over the rows before it, and update_ratio_growth reports it. The cause is in the loop.
    suite = DetectorSuite.from_names(DEFAULT_DETECTORS)
    saved = None
    for r in rollback_rows(spike=True, stop=53):
        suite.update(r["step"], r)
        if r["step"] == 40:
            saved = json.loads(json.dumps(suite.state_dict()))
    suite.load_state_dict(saved)
    replay = rollback_rows(spike=False, lr_scale=0.01, start=41)
    normal = rollback_rows(spike=False, start=41)
    replay[9]["update_ratio_max"] = normal[9]["update_ratio_max"]  # step 50 at the normal LR
    events = [e for r in replay for e in suite.update(r["step"], r)]
    assert [(e.step, e.detector, e.kind) for e in events] == [
        (50, "update_ratio_growth", "leading")]


def test_states_saved_before_the_new_fields_still_load():
    # checkpoints written before the attention rule's envelope and loss mute (raw, mute) and
    # loss_spike's early rule (early_held) existed: they load, and the stream goes on
    rows = falling_loss(200)
    for name, keys in [("attn_logit_growth", ("raw", "mute")), ("loss_spike", ("early_held",))]:
        (det,) = build_detectors([name])
        run(det, rows[:100])
        state = json.loads(json.dumps(det.state_dict()))
        for key in keys:
            del state["state"][key]
        (fresh,) = build_detectors([name])
        fresh.load_state_dict(state)
        assert run(fresh, rows[100:]) == []
