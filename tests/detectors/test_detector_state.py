"""State round trips: a detector restored mid-stream continues exactly; NaN at the first row."""

from __future__ import annotations

import json
import math

import pytest
from detector_series import falling_loss, run

from benchmarks.detectors.traces import make_trace
from stability.detectors import REGISTRY, DetectorSuite, build_detectors

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
