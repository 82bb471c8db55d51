"""End to end: with logger.wandb.mode=offline the run's W&B file holds the metrics and an alert;
the runs of a multirun carry their group, job type, names and tags."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import wandb_records as wr
from helpers import REPO

from stability.runfiles import read_jsonl


@pytest.mark.slow
def test_offline_training_run_holds_metrics_and_an_alert(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true", WANDB_MODE="disabled",
               WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
               WANDB_DATA_DIR=str(tmp_path / "wandb-data"))
    env.pop("WANDB_API_KEY", None)
    # WANDB_MODE=disabled in the environment: the config's mode must win. The NaN fault at the
    # last step makes the nonfinite detector fire (loss and grad_norm: one incident, one alert).
    proc = subprocess.run(
        [sys.executable, "-m", "stability.train", "size=tiny", "trainer.train_steps=5",
         "trainer.threads=1", "logger.wandb.mode=offline", "logger.console=false",
         "fault.at_step=5", "fault.kind=nan", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    records = wr.read_finished(files[0])
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    history = {h["step"]: h for h in wr.history(records) if "train/loss" in h}
    assert sorted(history) == [1, 2, 3, 4, 5]
    for row in metrics:
        logged = history[row["step"]]
        if math.isfinite(row["loss"]):
            assert logged["train/loss"] == pytest.approx(row["loss"], rel=1e-12)
        else:
            assert math.isnan(logged["train/loss"])
        assert logged["train/grad_norm"] == pytest.approx(row["grad_norm"], nan_ok=True)
    assert not any(k.startswith("other/") for h in history.values() for k in h)

    alerts = wr.alerts(records)
    assert [(a["title"], a["level"]) for a in alerts] == [("non-finite loss at step 5", "ERROR")]
    assert "action: stop" in alerts[0]["text"] and "also: nonfinite on grad_norm" in \
        alerts[0]["text"]
    summary = wr.summary(records)
    assert summary["status"] == "stopped" and summary["spike/events"] == 2
    assert list((run_dir / "wandb").glob("offline-run-*/files/media/table/**/*.table.json"))


@pytest.mark.slow
def test_offline_multirun_runs_carry_group_job_type_names_and_tags(tmp_path):
    """Two runs of one multirun, W&B switched on by the environment only (WANDB_MODE,
    WANDB_PROJECT): both are in the sweep's group, with job type, readable names and tags."""
    sweep_dir = tmp_path / "lr-study"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true", WANDB_MODE="offline",
               WANDB_PROJECT="from-env", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
               WANDB_DATA_DIR=str(tmp_path / "wandb-data"))
    for var in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_NAME", "WANDB_RUN_GROUP",
                "WANDB_JOB_TYPE"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-m", "stability.train", "-m", "recipe=gpt", "optim.lr=1e-3,3e-3",
         "trainer.train_steps=3", "trainer.threads=1", "logger.console=false",
         "checkpoint.interval=0", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    runs = {}
    for job in ("0", "1"):
        info = wr.run_info(wr.read_finished(wr.run_file(sweep_dir / job / "wandb")))
        runs[info.display_name] = info
        stored = json.loads((sweep_dir / job / "wandb_run.json").read_text())
        assert stored["id"] == info.run_id and stored["name"] == info.display_name
    assert sorted(runs) == [  # the run's overrides (Hydra's override_dirname), not "0" or "1"
        f"gpt-tiny/checkpoint.interval=0,optim.lr={lr},trainer.threads=1,trainer.train_steps=3"
        for lr in ("0.001", "0.003")]  # a swept value as Hydra writes it
    for info in runs.values():
        assert info.run_group == "lr-study" and info.job_type == "train"
        assert list(info.tags) == ["gpt", "tiny"] and info.project == "from-env"
