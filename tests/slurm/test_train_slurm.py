"""The training command on the local SLURM cluster through `hydra/launcher=slurm`: a grid sweep,
a 2-task data-parallel job, and a job that is signalled, requeued and resumed.

Real SLURM, real submitit, real training (tiny model, tens of steps)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from stability.runfiles import read_jsonl

pytestmark = pytest.mark.slurm

TRAIN = [sys.executable, "-m", "stability.train", "-m", "hydra/launcher=slurm"]


def sweep(sweep_dir: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([*TRAIN, *overrides, f"hydra.sweep.dir={sweep_dir}"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def job_ids(sweep_dir: Path) -> list[str]:
    """SLURM ids of the sweep's jobs, in job order, from submitit's folders (`<array>_<task>`
    for a job array; a plain id when the sweep has one job)."""
    folders = [p for p in (sweep_dir / ".submitit").iterdir() if any(p.glob("*_submitted.pkl"))]
    return sorted((p.name for p in folders), key=lambda n: int(n.partition("_")[2] or 0))


def rows(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")  # a partial last line is skipped


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def sacct_states(job: str) -> list[str]:
    """Every run of the job (-D: requeued runs too), oldest first."""
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-j", job, "-o", "State"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return [line.split()[0] for line in out.split("\n") if line.strip()]


@pytest.fixture(scope="module")
def grid(slurm_cluster, tmp_path_factory) -> Path:
    """The 2 x 2 sweep of the issue, run once for the tests below: 4 jobs of 20 steps."""
    sweep_dir = tmp_path_factory.mktemp("grid")
    sweep(sweep_dir, "recipe=llama2", "size=tiny", "trainer.train_steps=20",
          "optim.lr=1e-3,3e-3", "trainer.seed=1,2")
    return sweep_dir


def test_grid_sweep_runs_as_slurm_jobs(slurm_cluster, grid):
    jobs = job_ids(grid)
    assert len(jobs) == 4, jobs
    for job in jobs:
        assert slurm_cluster.final_state(job) == ("COMPLETED", "0:0"), job
    for num in range(4):
        assert summary(grid / str(num))["status"] == "completed"
        assert [r["step"] for r in rows(grid / str(num))] == list(range(1, 21))
    table = subprocess.run([sys.executable, "-m", "analysis.table", str(grid)], cwd=REPO,
                           capture_output=True, text=True, timeout=120, check=True).stdout
    lines = [line for line in table.splitlines() if line and not line.startswith("#")]
    assert len(lines) == 1 + 4, table  # header + one row per run
    assert sum("completed" in line for line in lines) == 4, table
    for lr in ("0.001", "0.003"):
        assert sum(f"optim.lr={lr}" in line for line in lines) == 2, table


def test_two_tasks_train_data_parallel_and_match_one_process(slurm_cluster, grid, tmp_path):
    """tasks_per_node=2: submitit starts the run on both ranks (SLURM_PROCID/SLURM_NTASKS), which
    join over gloo; micro batch 4 x 2 ranks = the single run's global batch of 8."""
    sweep(tmp_path, "recipe=llama2", "size=tiny", "trainer.train_steps=20", "optim.lr=3e-3",
          "trainer.seed=1", "trainer.micro_batch_size=4", "hydra.launcher.tasks_per_node=2")
    (job,) = job_ids(tmp_path)
    assert slurm_cluster.final_state(job) == ("COMPLETED", "0:0")
    logs = {p.name: p.read_text() for p in (tmp_path / ".submitit" / job).glob("*_log.*")}
    text = "".join(logs.values())
    assert "global_rank=0(2)" in text and "global_rank=1(2)" in text, text[-3000:]
    # Rank 0 alone prints the progress line: rank 1 knew it was rank 1 of 2 (a process that took
    # itself for a single run would print too, and write the same run directory).
    assert re.search(r"^step +20/20", logs[f"{job}_0_log.out"], flags=re.M), logs
    assert not re.search(r"^step ", logs[f"{job}_1_log.out"], flags=re.M), logs
    config = (tmp_path / "0" / "config.yaml").read_text()
    assert "micro_batch_size: 4" in config
    # The grid's run with the same recipe, LR and seed: one process, micro batch 8.
    (reference,) = [d for d in grid.iterdir() if (d / ".hydra" / "overrides.yaml").exists()
                    and {"optim.lr=0.003", "trainer.seed=1"}
                    <= set(yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()))]
    single = rows(reference)
    dp = rows(tmp_path / "0")
    assert [r["step"] for r in dp] == list(range(1, 21))
    for a, b in zip(single, dp, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5, rel=1e-5), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=1e-5, rel=1e-5), a["step"]
    assert summary(tmp_path / "0")["status"] == "completed"


def test_signalled_job_is_requeued_and_resumes(slurm_cluster, tmp_path):
    """USR2 before the time limit (what SLURM sends at preemption or `signal_delay_s` before the
    limit): the trainer checkpoints at the step boundary, submitit requeues the job, and the new
    run resumes from the checkpoint; metrics.jsonl holds every step once."""
    steps = 60  # enough that the job is still running when the signal arrives
    proc = subprocess.Popen(
        [*TRAIN, "recipe=llama2", "size=tiny", f"trainer.train_steps={steps}",
         "checkpoint.interval=5", f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "0"
    try:
        deadline = time.monotonic() + 300
        while len(rows(run_dir)) < 7:  # past the checkpoint at step 5
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "the job did not reach step 7 in 300 s"
            time.sleep(0.1)
        (job,) = job_ids(tmp_path)
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert slurm_cluster.final_state(job) == ("COMPLETED", "0:0")
    states = sacct_states(job)
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states

    assert [r["step"] for r in rows(run_dir)] == list(range(1, steps + 1))
    assert summary(run_dir)["status"] == "completed"
    # submitit's logs hold both runs (appended to over the requeue).
    logs = {p.suffix: p.read_text() for p in (tmp_path / ".submitit" / job).glob("*_log.*")}
    both = logs[".out"] + logs[".err"]
    assert both.count("Starting with JobEnvironment") == 2, both[-3000:]
    assert "this job is preempted" in both and f"Requeued job {job}" in both, both[-3000:]
    # The console line of step 1 appears once: the second run started after the checkpoint.
    printed = [int(m) for m in re.findall(r"^step +(\d+)/", logs[".out"], flags=re.M)]
    assert printed.count(1) == 1 and printed[-1] == steps, printed
