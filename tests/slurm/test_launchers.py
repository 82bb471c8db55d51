"""Our Hydra launcher configs (stability/conf/hydra/launcher/{slurm,local}.yaml) run a 2-job
multirun.

The app is a throwaway one in a temp config dir holding copies of the launcher files, so these
tests check the launchers alone, without the training code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stability.config import CONF_DIR

LAUNCHERS = CONF_DIR / "hydra" / "launcher"

APP = """
import json, os, sys, time
import hydra

@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    keys = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS")
    out = {"x": cfg.x, "pid": os.getpid(), **{k: os.environ.get(k) for k in keys}}
    # A file barrier: the two jobs see each other only if they run at the same time.
    here = sys.path[0]
    open(os.path.join(here, f"started-{cfg.x}"), "w").close()
    deadline = time.time() + 60
    while time.time() < deadline and len([f for f in os.listdir(here)
                                          if f.startswith("started-")]) < 2:
        time.sleep(0.05)
    out["overlapped"] = len([f for f in os.listdir(here) if f.startswith("started-")]) == 2
    with open(os.path.join(sys.path[0], f"out-{cfg.x}.json"), "w") as f:
        json.dump(out, f)
    return cfg.x * 10

if __name__ == "__main__":
    main()
"""


def make_app(tmp_path: Path) -> Path:
    (tmp_path / "conf" / "hydra" / "launcher").mkdir(parents=True)
    for name in ("slurm.yaml", "local.yaml"):
        shutil.copy(LAUNCHERS / name, tmp_path / "conf" / "hydra" / "launcher" / name)
    (tmp_path / "conf" / "config.yaml").write_text(
        f"x: 0\nhydra:\n  sweep:\n    dir: {tmp_path}/multirun\n    subdir: ${{hydra.job.num}}\n"
    )
    (tmp_path / "app.py").write_text(APP)
    return tmp_path / "app.py"


def multirun(app: Path, *overrides: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(app), "-m", *overrides, "x=1,2"],
        cwd=app.parent,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((app.parent / f"out-{x}.json").read_text()) for x in (1, 2)]


@pytest.mark.slurm
def test_slurm_launcher_runs_a_multirun_on_the_cluster(slurm_cluster, tmp_path: Path) -> None:
    outs = multirun(make_app(tmp_path), "hydra/launcher=slurm")
    jobs = [o["SLURM_JOB_ID"] for o in outs]
    assert all(jobs) and len(set(jobs)) == 2, outs
    assert {(o["SLURM_PROCID"], o["SLURM_CPUS_PER_TASK"], o["OMP_NUM_THREADS"]) for o in outs} == {
        ("0", "1", "1")
    }
    script = next((tmp_path / "multirun" / ".submitit").glob("*/*_submission.sh")).read_text()
    for flag in ("--requeue", "--signal=USR2@120", "--time=60", "--cpus-per-task=1"):
        assert f"#SBATCH {flag}\n" in script, script
    for job in jobs:
        assert slurm_cluster.final_state(job) == ("COMPLETED", "0:0")


@pytest.mark.slow
def test_local_launcher_runs_jobs_in_parallel_processes(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    outs = multirun(make_app(tmp_path), "hydra/launcher=local", "hydra.launcher.n_jobs=2")
    assert all(o["overlapped"] for o in outs), outs  # both ran at the same time
    assert len({o["pid"] for o in outs}) == 2, outs  # in two worker processes
    assert not any(o["SLURM_JOB_ID"] for o in outs)
