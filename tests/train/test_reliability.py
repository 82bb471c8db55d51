"""The run directory is a safe place for results: nothing executed from checkpoints, nothing
lost or rewritten by running a command again, no silent mix of configs (docs/reliability.md).

Each test runs the training command as a user would, on a tiny model, and looks at the files.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, make_config

from stability.checkpoint import Checkpointer, complete_checkpoints
from stability.config import to_yaml
from stability.optim.adamw import build_optimizer, build_scheduler
from stability.runfiles import RunLock, read_jsonl

BASE = ["recipe=llama2", "size=tiny", "optim.lr=3e-3", "logger.console=false",
        "trainer.threads=1"]


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "stability.train", *BASE, *overrides, f"hydra.run.dir={run_dir}"]


def train(run_dir: Path, *overrides: str, status: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(run_dir, *overrides), cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return read_jsonl(run_dir / name)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under the run directory (but the lock and Hydra's log), by content."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in ("run.lock", "train.log")
            and ".hydra" not in p.parts}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A completed 12-step run with checkpoints at 4, 8 and 12; tests copy it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(run_dir, "trainer.train_steps=12", "checkpoint.interval=4", "checkpoint.keep_last=3")
    return run_dir


def copy_of(finished: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


# ---------------------------------------------------------------------- 1. no code execution
class Payload:
    """What a malicious checkpoint holds: unpickling it creates a directory."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_a_pickled_payload_in_a_checkpoint_is_refused_and_never_run(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "payload-ran"
    checkpoint = run_dir / "checkpoints" / "step_00000010"
    checkpoint.mkdir(parents=True)
    torch.save({"step": Payload(marker)}, checkpoint / "rank_00000.pt")
    (checkpoint / "config.yaml").write_text(to_yaml(make_config(*BASE, "trainer.train_steps=12")))
    files = {p.name: p.stat().st_size for p in checkpoint.iterdir()}
    (checkpoint / "meta.json").write_text(json.dumps({
        "format": 2, "step": 10, "files": files,
        "layout": {"world_size": 1, "tensor": 1, "pipeline": 1, "data": 1}}))
    proc = train(run_dir, "trainer.train_steps=12", status=2)
    assert not marker.exists()
    lines = error_lines(proc)
    assert len(lines) == 1 and "rank_00000.pt" in lines[0] and "weights_only" in lines[0], lines
    assert (checkpoint / "rank_00000.pt").exists()  # refused, not deleted


# ---------------------------------------------------------------------- 2. finished runs
def test_running_a_finished_run_again_changes_nothing(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    proc = train(run_dir, "trainer.train_steps=12", "checkpoint.interval=4",
                 "checkpoint.keep_last=3")
    assert f"run already completed at step 12: {run_dir}" in proc.stdout + proc.stderr
    assert snapshot(run_dir) == before

    from stability.train import run  # what Hydra and Optuna get back: the stored objective

    cfg = make_config(*BASE, "trainer.train_steps=12", "checkpoint.interval=4",
                      "checkpoint.keep_last=3")
    assert run(cfg, run_dir) == json.loads((run_dir / "summary.json").read_text())


def test_a_requeue_after_preemption_at_the_last_step_completes_the_run(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "preempted"}))
    train(run_dir, "trainer.train_steps=12", "checkpoint.interval=4", "checkpoint.keep_last=3")
    after = json.loads((run_dir / "summary.json").read_text())
    assert after["status"] == "completed" and after["steps"] == 12
    assert after["final_loss"] == summary["final_loss"] == rows(run_dir)[-1]["loss"]
    assert after["eval_loss"] == summary["eval_loss"] == rows(run_dir)[-1]["eval_loss"]
    assert [r["step"] for r in rows(run_dir)] == list(range(1, 13))


# ---------------------------------------------------------------------- 3. resume=never
def test_resume_never_on_a_directory_with_a_run_refuses_and_deletes_nothing(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    proc = train(run_dir, "trainer.train_steps=12", "checkpoint.resume=never", status=2)
    lines = error_lines(proc)
    assert len(lines) == 1 and "already holds a run" in lines[0], lines
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------------- 4. config changes
def lr_at(step: int, *overrides: str) -> float:
    """The LR of (1-based) step ``step`` under the schedule of ``overrides``."""
    cfg = make_config(*BASE, *overrides)
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.train_steps)
    scheduler.step(step)
    return optimizer.param_groups[0]["lr"]


def test_a_longer_run_and_a_new_lr_apply_from_the_resume_and_are_recorded(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    first = rows(run_dir)
    old_config = (run_dir / "config.yaml").read_text()
    proc = train(run_dir, "trainer.train_steps=20", "optim.lr=1e-3", "checkpoint.interval=4",
                 "checkpoint.keep_last=3")
    after = rows(run_dir)
    assert [r["step"] for r in after] == list(range(1, 21))
    assert after[:12] == first  # what was trained stays as it was
    new = ("trainer.train_steps=20", "optim.lr=1e-3")
    for row in after[12:]:  # the schedule of the new values, from the saved step on
        assert row["lr"] == pytest.approx(lr_at(row["step"], *new), rel=1e-12), row["step"]
    log = proc.stdout + proc.stderr
    assert "resume at step 12: optim.lr 0.003 -> 0.001" in log
    assert "resume at step 12: trainer.train_steps 12 -> 20" in log
    assert (run_dir / "config.resume-00000012.yaml").read_text() == old_config
    config = (run_dir / "config.yaml").read_text()
    assert "lr: 0.001" in config and "train_steps: 20" in config
    newest = complete_checkpoints(run_dir / "checkpoints")[-1]
    assert (newest / "config.yaml").read_text() == config  # each checkpoint has its config


def test_a_key_the_checkpoint_fixes_is_refused_before_any_work(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    proc = train(run_dir, "trainer.train_steps=16", "model.hidden_size=32", status=2)
    lines = error_lines(proc)
    assert len(lines) == 1 and "model.hidden_size cannot change" in lines[0], lines
    assert snapshot(run_dir) == before  # config.yaml included


# ---------------------------------------------------------------------- 5. torn JSON lines
def test_a_bad_line_in_metrics_or_events_loses_nothing_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    spike = ["fault.at_step=26", "fault.kind=lr_spike", "fault.magnitude=300",
             "checkpoint.interval=16"]
    train(run_dir, "trainer.train_steps=32", *spike)
    events = (run_dir / "events.jsonl").read_text().splitlines(keepends=True)
    assert events, "the fault should have made events"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines[:4] + ["garbage\n"] + lines[4:]))
    (run_dir / "events.jsonl").write_text("".join(["{not json\n"] + events[1:]))  # in place
    train(run_dir, "trainer.train_steps=36", *spike)
    assert [r["step"] for r in rows(run_dir)] == list(range(1, 37))
    assert "garbage\n" in (run_dir / "metrics.jsonl").read_text()  # kept as evidence
    after = (run_dir / "events.jsonl").read_text().splitlines(keepends=True)
    assert after[:len(events)] == ["{not json\n"] + events[1:]


# ---------------------------------------------------------------------- 6. damaged checkpoints
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    latest = run_dir / "checkpoints" / "step_00000012" / "rank_00000.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # a torn copy
    proc = train(run_dir, "trainer.train_steps=16", "checkpoint.interval=4",
                 "checkpoint.keep_last=3")
    warning = [line for line in (proc.stdout + proc.stderr).splitlines()
               if "damaged checkpoint" in line]
    assert len(warning) == 1 and "step_00000012" in warning[0] and "1000 bytes" in warning[0]
    assert [r["step"] for r in rows(run_dir)] == list(range(1, 17))  # 9-12 again, once


def test_no_intact_checkpoint_is_one_line_and_nothing_is_deleted(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    for checkpoint in complete_checkpoints(run_dir / "checkpoints"):
        (checkpoint / "rank_00000.pt").unlink()
    (run_dir / "summary.json").unlink()  # as if it had crashed
    before = snapshot(run_dir)
    proc = train(run_dir, "trainer.train_steps=12", "checkpoint.interval=4",
                 "checkpoint.keep_last=3", status=2)
    lines = error_lines(proc)
    assert len(lines) == 1 and "no intact checkpoint" in lines[0], lines
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------------- 7. one process per run
def test_a_second_process_on_the_run_directory_exits_2_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    lock = RunLock(run_dir / "run.lock").acquire()
    try:
        proc = train(run_dir, "trainer.train_steps=4", status=2)
    finally:
        lock.release()
    lines = error_lines(proc)
    assert len(lines) == 1 and f"pid {os.getpid()} on host {socket.gethostname()}" in lines[0]
    assert not (run_dir / "metrics.jsonl").exists()


# ---------------------------------------------------------------------- 9. durable saves
def test_saves_are_fsynced_before_the_rename_and_old_ones_renamed_aside(tmp_path, monkeypatch):
    log: list[tuple[str, str]] = []
    real_fsync, real_rename, real_rmtree = os.fsync, Path.rename, shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: (log.append(
        ("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(Path, "rename", lambda self, target: (log.append(
        ("rename", f"{self.name}->{Path(target).name}")), real_rename(self, target))[1])
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: (log.append(
        ("rmtree", Path(path).name)), real_rmtree(path, **kw))[1])
    root = tmp_path / "checkpoints"
    checkpointer = Checkpointer(root, keep_last=1, rank=0, world_size=1,
                                device=torch.device("cpu"), layout={"world_size": 1})
    for step in (1, 2):
        checkpointer.save({"weights": torch.full((3,), float(step))}, step, "config: 1\n")
    published = log.index(("rename", ".tmp-step_00000002->step_00000002"))
    # config.yaml and meta.json are written to a temporary name, fsynced, then renamed
    synced = {re.sub(r"^\.(.+)\.tmp-\d+$", r"\1", Path(path).name)
              for kind, path in log[:published] if kind == "fsync"}
    assert {"rank_00000.pt", "config.yaml", "meta.json", ".tmp-step_00000002"} <= synced
    assert ("fsync", str(root)) in log[published:]  # the rename itself made durable
    assert ("rename", "step_00000001->.trash-step_00000001") in log
    assert {name for kind, name in log if kind == "rmtree"} <= {".trash-step_00000001"}
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000002"]
    loaded = checkpointer.load()
    assert loaded is not None and loaded[0].step == 2 and loaded[1]["weights"][0] == 2.0


# ---------------------------------------------------------------------- kill -9, repeatedly
def kill_repeatedly(run_dir: Path, overrides: list[str], kills: int, seed: int) -> int:
    """Start the command, kill -9 it at a random moment (half of the times while a checkpoint
    is being written), start it again, ...; then let it finish. The kills that happened."""
    rng, done = random.Random(seed), 0
    for attempt in range(kills):
        proc = subprocess.Popen(command(run_dir, *overrides), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        during_save = attempt % 2 == 0
        deadline = time.time() + (60 if during_save else 4 + rng.uniform(0, 6))
        while time.time() < deadline and proc.poll() is None:
            if during_save and any((run_dir / "checkpoints").glob(".tmp-*")):
                time.sleep(rng.uniform(0, 0.02))
                break
            time.sleep(0.002)
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done += 1
    train(run_dir, *overrides)
    return done


@pytest.mark.parametrize("policy", ["alert", "rollback"])
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_run(tmp_path, policy):
    overrides = ["trainer.train_steps=40", "checkpoint.interval=2", "checkpoint.keep_last=4",
                 "fault.at_step=30", "fault.kind=lr_spike", "fault.magnitude=300",
                 f"actions.on_spike={policy}", "actions.rollback_skip_batches=3"]
    train(tmp_path / "reference", *overrides)
    reference = rows(tmp_path / "reference")
    kills = kill_repeatedly(tmp_path / "killed", overrides, kills=5, seed=len(policy))
    assert kills >= 3
    resumed = rows(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(1, 41))  # every step once
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in reference], key
    assert rows(tmp_path / "killed", "events.jsonl") == rows(tmp_path / "reference",
                                                            "events.jsonl")
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["rollbacks"] == json.loads(
        (tmp_path / "reference" / "summary.json").read_text())["rollbacks"]
    if policy == "rollback":
        assert summary["rollbacks"] >= 1


# ---------------------------------------------------------------------- a crash
def test_a_crash_leaves_status_crashed_and_a_resumable_run(tmp_path, monkeypatch):
    from stability.train import run
    from stability.trainer import Trainer

    original, run_dir = Trainer.train_step, tmp_path / "run"

    def crash_at_step_7(self):
        if self.state.step == 6:
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        original(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_7)
    cfg = make_config(*BASE, "trainer.train_steps=8", "checkpoint.interval=4")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run(cfg, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "crashed" and summary["steps"] == 6
    assert "illegal memory access" in summary["error"]
    assert [r["step"] for r in rows(run_dir)] == list(range(1, 7))  # the rows up to the crash
    train(run_dir, "trainer.train_steps=8", "checkpoint.interval=4")  # not finished: resumes
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert [r["step"] for r in rows(run_dir)] == list(range(1, 9))
