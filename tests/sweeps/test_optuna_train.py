"""An Optuna search over the LR with the real trainer: 6 trials of 10 steps write their study to
SQLite in the sweep directory; the same command again continues it to 12 trials."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
from helpers import REPO
from optuna.trial import TrialState


def search(sweep_dir, *launcher: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stability.train", "-m", "hydra/sweeper=optuna", *launcher,
         "optim.lr=tag(log, interval(1e-4, 1e-1))", "trainer.train_steps=10",
         "logger.console=false", "checkpoint.save_final=false", "hydra.sweeper.n_trials=6",
         "hydra.sweeper.n_jobs=2", "hydra.sweeper.seed=0", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_optuna_lr_search_is_stored_and_continued(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    search(tmp_path, "hydra/launcher=local", "hydra.launcher.n_jobs=2")  # 3 batches of 2
    assert len(optuna.load_study(study_name="train", storage=storage).trials) == 6
    search(tmp_path)  # again (here with the basic launcher): the study continues
    trials = optuna.load_study(study_name="train", storage=storage).trials
    assert [t.number for t in trials] == list(range(12))
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    assert len({t.params["optim.lr"] for t in trials}) == 12
    for trial in trials:
        run_dir = tmp_path / str(trial.number)
        assert trial.user_attrs["run_dir"] == str(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 10
        assert trial.value == pytest.approx(summary["final_loss"])
        assert f"lr: {trial.params['optim.lr']}" in (run_dir / "config.yaml").read_text()
    table = subprocess.run([sys.executable, "-m", "analysis.table", str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=120, check=True).stdout
    assert sum("completed" in line for line in table.splitlines()) == 12, table
