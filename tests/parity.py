"""Run ``python -m stability.train`` in one process or under torchrun on gloo, and compare runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from stability.runfiles import read_jsonl

STEPS = 10
COMMON = [f"trainer.train_steps={STEPS}", "trainer.threads=1", "checkpoint.interval=0",
          "checkpoint.save_final=false", "logger.console=false", "trainer.global_batch_size=8",
          # The same padded vocabulary at TP=1 and TP=2 (Megatron pads to 128 x TP).
          "model.vocab_size_divisible_by=256"]


def train(run_dir: Path, overrides: list[str], nproc: int = 1,
          steps: int = STEPS) -> list[dict]:
    """Train into ``run_dir``; its metrics.jsonl rows (one per step, checked)."""
    launcher = [sys.executable, "-m", "stability.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
                    "-m", "stability.train"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*launcher, *COMMON, *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    return rows


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_same(reference: list[dict], other: list[dict], keys=("loss", "grad_norm")) -> None:
    """Equal to 1e-5 step by step (the held-out loss at the end too), and the reference
    trained (its loss fell)."""
    for a, b in zip(reference, other, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), (a["step"], key)
    assert reference[-1]["eval_loss"] == pytest.approx(other[-1]["eval_loss"], abs=1e-5,
                                                       rel=1e-5)
    assert reference[-1]["loss"] < reference[0]["loss"]  # it trained
