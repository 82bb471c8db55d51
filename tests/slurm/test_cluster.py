"""The local SLURM cluster works the way our launchers use it: sbatch/srun, sacct, submitit,
requeue."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


def sbatch(*args: str) -> str:
    """Submit a batch job, return its id."""
    return sh("sbatch", "--parsable", *args).strip().split(";")[0]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_two_tasks_both_run_and_sacct_completed(slurm_cluster, tmp_path: Path) -> None:
    out = tmp_path / "ranks.out"
    job = sbatch(
        "--wait",
        "--ntasks=2",
        f"--output={out}",
        "--wrap",
        "srun bash -c 'echo rank=$SLURM_PROCID of=$SLURM_NTASKS'",
    )
    ranks = sorted(line for line in out.read_text().splitlines() if line.startswith("rank="))
    assert ranks == ["rank=0 of=2", "rank=1 of=2"]
    assert slurm_cluster.final_state(job) == ("COMPLETED", "0:0")


def test_failing_job_is_failed_in_sacct(slurm_cluster, tmp_path: Path) -> None:
    proc = subprocess.run(
        ["sbatch", "--parsable", "--wait", f"--output={tmp_path}/%j.out", "--wrap", "exit 3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    assert slurm_cluster.final_state(proc.stdout.strip()) == ("FAILED", "3:0")


def test_submitit_runs_a_function_and_returns_its_result(slurm_cluster, tmp_path: Path) -> None:
    import submitit

    def where(x: int) -> tuple[int, str, str]:  # pickled by value: a nested function
        return x * 7, os.environ["SLURM_JOB_PARTITION"], os.environ["SLURM_PROCID"]

    def boom() -> None:
        raise ValueError("as planned")

    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(
        slurm_partition=slurm_cluster.partition, timeout_min=5, cpus_per_task=1, mem_gb=1
    )
    job = executor.submit(where, 6)
    bad = executor.submit(boom)
    wait_until(lambda: job.done() and bad.done(), 60, "the submitit jobs")
    assert job.result() == (42, slurm_cluster.partition, "0")
    # job.state is submitit's cached view and may still say PENDING here: ask sacct.
    assert slurm_cluster.final_state(job.job_id) == ("COMPLETED", "0:0")
    with pytest.raises(submitit.core.utils.FailedJobError, match="as planned"):
        bad.result()
    assert slurm_cluster.final_state(bad.job_id)[0] == "FAILED"


def test_requeued_job_runs_again(slurm_cluster, tmp_path: Path) -> None:
    out = tmp_path / "requeue.out"
    job = sbatch(
        "--requeue",
        "--open-mode=append",
        f"--output={out}",
        "--wrap",
        "echo restart=${SLURM_RESTART_COUNT:-0}; sleep 60",
    )
    try:
        wait_until(
            lambda: "restart=0" in (out.read_text() if out.exists() else ""), 20, "the first run"
        )
        sh("scontrol", "requeue", job)
        # A requeued job may start again after AuthInfo cred_expire (5 s here, 120 s by default).
        wait_until(lambda: "restart=1" in out.read_text(), 40, "the second run")
    finally:
        subprocess.run(["scancel", job], check=False)
    assert "DUE TO JOB REQUEUE" in out.read_text()
    states = sh("sacct", "-n", "-P", "-X", "-D", "-j", job, "-o", "State").split()
    assert states[0] == "REQUEUED", states


def test_preempted_submitit_job_checkpoints_and_resumes(slurm_cluster, tmp_path: Path) -> None:
    """A job of `urgent` preempts one of `debug`: SLURM sends the preempted job submitit's
    signal (USR2), submitit calls its `checkpoint` and requeues it, and it resumes later."""
    import submitit

    class Steps(submitit.helpers.Checkpointable):
        def __init__(self, progress: Path) -> None:
            self.progress, self.done, self.starts = progress, 0, []

        def __call__(self, n: int) -> tuple[int, list]:
            self.starts.append((int(os.environ.get("SLURM_RESTART_COUNT", "0")), self.done))
            while self.done < n:
                self.progress.write_text(str(self.done))
                time.sleep(0.25)
                self.done += 1
            return self.done, self.starts

    cpus = int(sh("sinfo", "-h", "-p", slurm_cluster.partition, "-o", "%c").split()[0])
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    # timeout_min > 10: submitit takes a signal in the first 80% of the time limit (and more
    # than 10 min before its end) for a preemption; later ones count as timeouts.
    executor.update_parameters(
        slurm_partition=slurm_cluster.partition, timeout_min=30, cpus_per_task=cpus, mem_gb=1
    )
    progress = tmp_path / "progress"
    job = executor.submit(Steps(progress), 12)
    wait_until(progress.exists, 30, "the job to start")
    urgent = sbatch(
        "-p",
        slurm_cluster.urgent_partition,
        f"--cpus-per-task={cpus}",
        "--mem=100M",
        f"--output={tmp_path}/urgent.out",
        "--wrap",
        "sleep 1",
    )
    wait_until(job.done, 90, "the preempted job to finish")
    done, starts = job.result()
    assert done == 12
    assert len(starts) == 2 and starts[0] == (0, 0), starts
    assert starts[1][0] == 1 and 0 < starts[1][1] < 12, starts  # resumed from its checkpoint
    assert slurm_cluster.final_state(urgent) == ("COMPLETED", "0:0")
    log = Path(job.paths.stderr).read_text()
    assert "this job is preempted" in log, log
