"""The offline CLI: ``python -m stability.detect PATH [--detector NAME ...]``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from detector_series import ROOT, falling_loss

from stability.detect import main
from stability.detectors import DEFAULT_DETECTORS, DetectorSuite, read_metrics


def write_metrics(path, rows, torn_tail=True):
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")  # NaN / Infinity tokens, as Python's json writes them
        if torn_tail:
            f.write('{"step": 999, "loss": 2.')  # the run was killed mid-write
    return path


def spike_rows():
    rows = falling_loss(300)
    rows[120]["loss"] *= 1.6
    rows[200]["loss"] = math.nan
    rows[201]["grad_norm"] = math.inf
    return rows


def test_cli_prints_the_live_events(tmp_path, capsys):
    rows = spike_rows()
    path = write_metrics(tmp_path / "metrics.jsonl", rows)
    assert "NaN" in path.read_text() and "Infinity" in path.read_text()
    assert main([str(tmp_path)]) == 0  # a run directory works too
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    live = DetectorSuite.from_names(DEFAULT_DETECTORS)
    want = [e.to_json() for r in rows for e in live.update(r["step"], r)]
    assert json.dumps(out) == json.dumps(want)
    assert [(e["step"], e["kind"]) for e in out] == [
        (120, "spike"),
        (200, "nonfinite"),
        (201, "nonfinite"),
    ]
    assert math.isnan(out[1]["value"]) and out[2]["value"] == math.inf


def test_cli_detector_choice_params_and_state(tmp_path, capsys):
    path = write_metrics(tmp_path / "m.jsonl", spike_rows())
    state = tmp_path / "state.json"
    argv = [str(path), "--detector", "nonfinite", "--param", 'nonfinite.metrics=["loss"]']
    assert main([*argv, "--state-out", str(state)]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["step"], e["metric"]) for e in out] == [(200, "loss")]
    assert "nonfinite" in json.loads(state.read_text())["detectors"]


def test_read_metrics_reports_a_bad_line_and_keeps_the_rest(tmp_path, caplog):
    path = write_metrics(tmp_path / "m.jsonl", falling_loss(5))
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3, 4]
    path.write_text('{"step": 1}\n{"step": 2, "loss"\n{"step": 3}\n{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 3]  # the torn last line quietly
    assert [r.getMessage().split(": ")[0] for r in caplog.records] == [f"{path}:2"]
    assert main([str(path)]) == 0


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "stability.detect", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_cli_bad_input_exits_2_with_one_clear_line(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", falling_loss(5))
    cases = {
        (str(tmp_path / "missing.jsonl"),): "missing.jsonl",
        (str(path), "--detector", "nope"): "'nope' is not allowed: one of attn_logit_growth",
        (str(path), "--param", "loss_spike.windw=3"): "'windw' is not allowed: one of metric",
        (str(path), "--param", "oops"): "NAME.KEY=VALUE",
    }
    for args, needle in cases.items():
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)
    proc = run_cli("--list")
    assert proc.returncode == 0 and "loss_spike" in proc.stdout
