"""Tensor parallel 2 and data parallel 2 under torchrun on gloo match one process.

Same global batch, same seed: losses and grad norms agree to 1e-5 over 10 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

STEPS = 10
COMMON = [f"trainer.train_steps={STEPS}", "trainer.threads=1", "checkpoint.interval=0",
          "checkpoint.save_final=false", "logger.console=false", "trainer.global_batch_size=8",
          # The same padded vocabulary at TP=1 and TP=2 (Megatron pads to 128 x TP).
          "model.vocab_size_divisible_by=256"]


def train(run_dir: Path, overrides: list[str], nproc: int = 1) -> list[dict]:
    launcher = [sys.executable, "-m", "stability.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
                    "-m", "stability.train"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*launcher, *COMMON, *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return rows


def assert_same(reference: list[dict], other: list[dict]) -> None:
    for a, b in zip(reference, other, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5, rel=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5, rel=1e-5), a["step"]
    assert reference[-1]["loss"] < reference[0]["loss"]  # it trained


@pytest.mark.parametrize("recipe", ["llama2", "gpt"])
def test_tensor_parallel_2_matches_one_process(tmp_path, recipe):
    overrides = [f"recipe={recipe}", "optim.lr=3e-3", "trainer.micro_batch_size=8"]
    single = train(tmp_path / "tp1", overrides)
    tp2 = train(tmp_path / "tp2", [*overrides, "parallel.tensor=2"], nproc=2)
    assert_same(single, tp2)


def test_data_parallel_2_matches_one_process_with_accumulation(tmp_path):
    overrides = ["recipe=gpt", "optim.lr=3e-3", "trainer.micro_batch_size=4"]
    single = train(tmp_path / "dp1", overrides)  # 2 accumulation steps of 4
    dp2 = train(tmp_path / "dp2", overrides, nproc=2)  # 2 ranks x 4
    assert_same(single, dp2)
