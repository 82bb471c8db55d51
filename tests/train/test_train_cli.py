"""The training command end to end: the contract's files, the recipe's values, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, make_config

from stability.checkpoint import complete_checkpoints
from stability.runfiles import read_jsonl


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "stability.train", *overrides, "trainer.threads=1",
            f"hydra.run.dir={run_dir}"]


def run_ok(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(run_dir, *overrides), cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


RECIPE_VALUES = {
    "gpt": {"model.norm_type": "layernorm", "model.scaled_embedding": False,
            "loss.z_loss": 0.0, "optim.min_lr": 1e-6, "optim.eps": 1e-8,
            "model.init_std": 0.005, "model.position_embedding": "learned",
            "model.activation": "gelu", "model.bias": True},
    "llama2": {"model.norm_type": "rmsnorm", "model.scaled_embedding": True,
               "loss.z_loss": 1e-4, "optim.min_lr": 1e-5, "optim.eps": 1e-5,
               "model.init_std": 0.02, "model.position_embedding": "rope",
               "model.activation": "swiglu", "model.bias": False},
}
PUBLISHED_LR = {"gpt": 6e-5, "llama2": 1e-4}
CPU_LR = 3e-3  # the tiny preset's: the published LRs barely move a 1M model's loss


def check_contract(run_dir: Path, recipe: str, steps: int) -> list[dict]:
    """config.yaml (the recipe's values, CPU-scale LR and warmup), metrics.jsonl, summary.json,
    a checkpoint; the rows."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["recipe"] == recipe and config["size"] == "tiny"
    for dotted, expected in RECIPE_VALUES[recipe].items():
        section, key = dotted.split(".")
        assert config[section][key] == expected, dotted
    assert config["optim"]["lr"] == CPU_LR
    assert config["optim"]["warmup_steps"] == round(steps / 10)  # 10% of the run at CPU scale

    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("step", "loss", "grad_norm", "lr", "tokens", "time"):
        assert all(key in r for r in rows), key
    assert rows[-1]["tokens"] == steps * 8 * 128
    warmup = config["optim"]["warmup_steps"]
    assert rows[warmup - 1]["lr"] == pytest.approx(CPU_LR)  # the warmup's peak
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == steps
    assert summary["final_loss"] == pytest.approx(rows[-1]["loss"])
    assert complete_checkpoints(run_dir / "checkpoints")
    return rows


def test_train_writes_the_contract_files(tmp_path):
    run_dir = tmp_path / "gpt"
    proc = run_ok(run_dir, "recipe=gpt", "size=tiny", "trainer.train_steps=40")
    assert "step     40/40" in proc.stdout  # the console progress line
    check_contract(run_dir, "gpt", 40)


def test_the_default_command_learns(tmp_path):
    """``python -m stability.train`` (Llama2 recipe, tiny, 200 steps): the loss falls by more
    than a nat (at the published LR 1e-4 it fell 9.02 -> 8.80), and the start banner and the
    end line are in train.log."""
    run_dir = tmp_path / "default"
    proc = run_ok(run_dir)
    rows = check_contract(run_dir, "llama2", 200)
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-10:]) / 10
    assert first - last > 1.0, (first, last)
    log = (run_dir / "train.log").read_text()
    for part in ("recipe=llama2 size=tiny, 200 steps", "parameters (2 layers, d=64",
                 "device: cpu fp32, attention backend", "start: fresh start at step 0",
                 "step    200/200 | loss", "completed at step 200/200: final loss"):
        assert part in log and part in proc.stdout, part


@pytest.mark.parametrize("recipe", ["gpt", "llama2"])
def test_the_recipes_hold_the_published_lr_and_cpu_sizes_their_own(recipe):
    assert make_config(f"recipe={recipe}", "size=125m").optim.lr == PUBLISHED_LR[recipe]
    assert make_config(f"recipe={recipe}", "size=tiny").optim.lr == CPU_LR
    assert make_config(f"recipe={recipe}", "size=small").optim.lr == 1e-3  # wider: lower


def test_sigkill_and_rerun_gives_the_uninterrupted_losses(tmp_path):
    overrides = ["recipe=llama2", "size=tiny", "trainer.train_steps=30", "optim.lr=3e-3",
                 "checkpoint.interval=10", "logger.console=false"]
    run_ok(tmp_path / "ref", *overrides)
    reference = metrics(tmp_path / "ref")

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(command(run_dir, *overrides), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it between the checkpoint at 10 and the one at 20
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 15:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()
    assert len(metrics(run_dir)) < 30

    run_ok(run_dir, *overrides)  # the same command again resumes
    resumed = metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 31))  # every step once
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in reference]
