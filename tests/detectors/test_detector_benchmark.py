"""The detector benchmark: deterministic labelled traces, and the default set meets the bar."""

from __future__ import annotations

import json
import math

import numpy as np

from benchmarks.detectors.evaluate import evaluate
from benchmarks.detectors.run import main as bench_main
from benchmarks.detectors.run import meets_bar
from benchmarks.detectors.traces import (
    BENIGN_MAX,
    HELDOUT_SEED0,
    SPIKE_LARGE,
    SPIKE_SUSTAINED,
    SUSTAIN,
    dump,
    load_real,
    make_set,
    make_trace,
)
from stability.detectors import DEFAULT_DETECTORS


def test_traces_are_deterministic_and_labelled_by_the_rule():
    a, b = make_trace(7, "spike"), make_trace(7, "spike")
    assert json.dumps(a.rows) == json.dumps(b.rows) and a.incidents == b.incidents
    assert json.dumps(make_trace(7, "clean").rows) != json.dumps(a.rows)
    for seed in range(12):
        tr = make_trace(seed, "spike")
        loss = np.array([r["loss"] for r in tr.rows])
        excess = loss / np.array(tr.trend) - 1
        for inc in tr.incidents:
            if inc.kind == "nonfinite":
                bad = [r["step"] for r in tr.rows if not all(map(math.isfinite, (r["loss"],
                       r["grad_norm"])))]  # fmt: skip
                assert inc.onset in bad and inc.onset - 1 not in bad
            else:  # the observed loss is far above the clean trend at (or soon after) onset
                window = excess[inc.onset : inc.onset + SUSTAIN]
                window = window[np.isfinite(window)]
                assert window.max() > min(SPIKE_LARGE, SPIKE_SUSTAINED) - BENIGN_MAX
    clean = make_trace(3, "clean")
    excess = np.array([r["loss"] for r in clean.rows]) / np.array(clean.trend) - 1
    assert excess.max() < (1 + BENIGN_MAX) * 1.06 - 1  # noise/hard batches x benign bumps


def test_default_set_meets_the_bar_on_heldout_seeds():
    traces = make_set(HELDOUT_SEED0, n_clean=14, n_spike=22)
    res = evaluate(traces, names=DEFAULT_DETECTORS)
    assert meets_bar(res) == [], res["sets"]["default"]
    lead = res["lead"]["any_leading"]
    assert lead["incidents"] >= 3 and lead["before_loss"] >= 0.5
    assert lead["lead_vs_loss_steps"]["mean"] > 0


def test_real_trace_folder_and_command_line(tmp_path, capsys):
    assert load_real(tmp_path) == []  # no labels.json: nothing to score
    tr = make_trace(5, "spike")
    dump(tr, tmp_path / "run5.jsonl")
    labels = json.loads((tmp_path / "run5.jsonl.labels.json").read_text())
    (tmp_path / "labels.json").write_text(json.dumps({"run5.jsonl": labels}))
    (real,) = load_real(tmp_path)
    assert real.family == "spike" and [i.onset for i in real.incidents] == [
        i.onset for i in tr.incidents
    ]
    out = tmp_path / "bench.json"
    status = bench_main(["--sets", "heldout", "--n-clean", "2", "--n-spike", "3",
                         "--detector", "loss_spike", "--json", str(out)])  # fmt: skip
    assert status in (0, 1)
    text = capsys.readouterr().out
    assert "[default]" in text and "loss_spike" in text
    assert "default" in json.loads(out.read_text())["heldout"]["sets"]
