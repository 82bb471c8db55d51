"""Detectors and actions on real runs with injected faults (issue: Watch, acceptance)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, make_config, make_trainer

from stability.callbacks import Callback
from stability.checkpoint import complete_checkpoints
from stability.optim.adamw import build_optimizer, build_scheduler
from stability.runfiles import read_jsonl
from stability.watch.actions import SpikeWatch
from stability.watch.fault import FaultInjector

SPIKE = ["size=tiny", "recipe=llama2", "optim.lr=3e-3", "trainer.train_steps=70",
         "fault.at_step=50", "fault.kind=lr_spike", "fault.magnitude=300",
         "checkpoint.interval=10", "checkpoint.keep_last=4", "logger.console=false",
         "trainer.threads=1"]


def train(run_dir: Path, *overrides: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "stability.train", *overrides,
                           f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((run_dir / "summary.json").read_text())


def rows(path: Path) -> list[dict]:
    return read_jsonl(path)


def test_lr_spike_is_detected_within_3_steps_and_a_leading_detector_fires_first(tmp_path):
    summary = train(tmp_path, *SPIKE, "actions.on_spike=alert")
    assert summary["status"] == "completed"
    events = rows(tmp_path / "events.jsonl")
    loss_events = [e for e in events if e["detector"] == "loss_spike" and e["step"] >= 50]
    assert loss_events and loss_events[0]["step"] <= 53, events
    assert loss_events[0]["action"] == "alert"
    leading = [e for e in events if e["kind"] == "leading" and e["step"] >= 50]
    assert leading and leading[0]["step"] < loss_events[0]["step"], events

    # Offline replay on the finished run gives the events the live run recorded.
    proc = subprocess.run([sys.executable, "-m", "stability.detect", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    replayed = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [{**e, "action": ""} for e in events] == replayed


def test_rollback_skips_batches_and_completes_with_finite_loss(tmp_path):
    summary = train(tmp_path, *SPIKE, "actions.on_spike=rollback",
                    "actions.rollback_skip_batches=5")
    assert summary["status"] == "completed" and summary["rollbacks"] >= 1
    assert math.isfinite(summary["final_loss"])
    actions = [e["action"] for e in rows(tmp_path / "events.jsonl")]
    assert "rollback" in actions
    metrics = rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, 71))  # rolled-back steps cut, once
    # The schedule continues from the checkpoint's step (megatron's scheduler, loaded as a
    # state dict, added the steps to its own count and put a rollback at min_lr).
    cfg = make_config(*SPIKE)
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.train_steps)
    for row in metrics:
        scheduler.step(1)
        assert row["lr"] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12), row["step"]


def test_stop_leaves_a_resumable_checkpoint(tmp_path):
    summary = train(tmp_path, *SPIKE, "actions.on_spike=stop")
    assert summary["status"] == "stopped"
    assert 50 <= summary["steps"] <= 53
    latest = complete_checkpoints(tmp_path / "checkpoints")[-1]
    assert json.loads((latest / "meta.json").read_text())["step"] == summary["steps"]


def test_nan_is_caught_at_the_first_bad_step_and_never_applied(tmp_path):
    summary = train(tmp_path, *SPIKE[:4], "fault.at_step=12", "fault.kind=nan",
                    "trainer.train_steps=30", "logger.console=false", "trainer.threads=1")
    assert summary["status"] == "stopped" and summary["steps"] == 12
    first = rows(tmp_path / "events.jsonl")[0]
    assert (first["step"], first["kind"], first["action"]) == (12, "nonfinite", "stop")
    latest = complete_checkpoints(tmp_path / "checkpoints")[-1]
    state = torch.load(latest / "rank_00000.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


class ParameterProbe(Callback):
    """Copies the parameters before and after each optimizer step."""

    name = "probe"

    def __init__(self) -> None:
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}

    def before_optimizer_step(self, state, control) -> None:
        self.before[state.step + 1] = [p.detach().clone() for p in state.params]

    def on_step_end(self, state) -> None:
        self.after[state.step] = [p.detach().clone() for p in state.params]


class SkippedSteps(Callback):
    """The steps whose rows say they were skipped."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_metrics(self, state, flush, control) -> None:
        self.steps.extend(row["step"] for row in flush.rows if row["skipped"])


def test_skip_step_leaves_parameters_unchanged(tmp_path, single_process):
    cfg = make_config(*SPIKE, "actions.on_spike=skip_step")
    probe, rows = ParameterProbe(), SkippedSteps()
    callbacks = [FaultInjector(cfg.fault), SpikeWatch(cfg.detectors, cfg.actions), probe, rows]
    trainer = make_trainer(cfg, tmp_path, callbacks, single_process)
    assert trainer.fit()["status"] == "completed"
    skipped = rows.steps
    assert skipped and 50 <= skipped[0] <= 53, skipped
    for step in skipped:
        for before, after in zip(probe.before[step], probe.after[step], strict=True):
            assert torch.equal(before, after)
    normal = next(s for s in range(51, 70) if s not in skipped)
    assert not torch.equal(probe.before[normal][0], probe.after[normal][0])


def test_detector_state_survives_a_kill_and_resume(tmp_path):
    overrides = [*SPIKE[:4], "trainer.train_steps=32", "fault.at_step=24", "fault.kind=lr_spike",
                 "fault.magnitude=300", "checkpoint.interval=20", "logger.console=false",
                 "trainer.threads=1"]
    train(tmp_path / "ref", *overrides)
    reference = rows(tmp_path / "ref" / "events.jsonl")
    assert any(e["step"] >= 24 for e in reference)

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "stability.train", *overrides,
                             f"hydra.run.dir={run_dir}"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 600
    while time.time() < deadline and not complete_checkpoints(run_dir / "checkpoints"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    train(run_dir, *overrides)  # resumes from step 20: detectors must not be blind at 24
    assert rows(run_dir / "events.jsonl") == reference
