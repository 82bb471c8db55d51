"""`hydra/sweeper=optuna` (hydra_plugins/stability_optuna) on a throwaway Hydra app: search
spaces from Hydra's grammar, persistent storage and resume, failures. No training here: the app
returns a number computed from its config (test_optuna_train.py runs the real trainer)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.stability_optuna.sweeper import search_space

APP = """
import json, math, os
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    out = HydraConfig.get().runtime.output_dir
    with open(os.path.join(out, "seen.json"), "w") as f:
        json.dump({"x": cfg.x, "k": cfg.k, "name": cfg.name}, f)
    if cfg.x > cfg.crash_above:
        raise RuntimeError("crashed as planned")
    if cfg.x > cfg.nan_above:
        return float("nan")
    return (math.log10(cfg.x) + 2) ** 2 + cfg.k

if __name__ == "__main__":
    main()
"""


def make_app(tmp_path: Path) -> Path:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(
        "x: 1.0\nk: 0\nname: a\ncrash_above: 1.0e9\nnan_above: 1.0e9\n"
        "hydra:\n  sweep:\n    dir: " + str(tmp_path / "sweep") + "\n"
        "    subdir: ${hydra.job.num}\n")
    (tmp_path / "app.py").write_text(APP)
    return tmp_path / "app.py"


def sweep(app: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(app), "-m", "hydra/sweeper=optuna", *overrides],
        cwd=app.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def load(app: Path, name: str = "app") -> optuna.Study:
    storage = f"sqlite:///{app.parent / 'sweep' / 'optuna.db'}"
    return optuna.load_study(study_name=name, storage=storage)


def test_search_space_from_hydra_grammar():
    parser = OverridesParser.create()
    space, fixed = search_space(parser.parse_overrides([
        "a=interval(0.1, 0.5)", "b=tag(log, interval(1e-4, 1))", "c=tag(int, interval(1, 9))",
        "d=range(0, 41, 10)", "e=choice(gpt, llama2)", "f=1e-3,3e-3", "g=range(0.5, 2.0, 0.5)",
        "h=7", "+i=x", "h=8"]))
    assert space == {
        "a": FloatDistribution(0.1, 0.5), "b": FloatDistribution(1e-4, 1.0, log=True),
        "c": IntDistribution(1, 9), "d": IntDistribution(0, 40, step=10),  # Hydra's range: stop
        "e": CategoricalDistribution(["gpt", "llama2"]),                   # is excluded
        "f": CategoricalDistribution([1e-3, 3e-3]), "g": CategoricalDistribution([0.5, 1.0, 1.5]),
    }
    assert fixed == ["+i=x", "h=8"]  # a key given twice: the last value wins


def test_a_search_is_stored_and_continued(tmp_path):
    app = make_app(tmp_path)
    args = ["x=tag(log, interval(1e-4, 1))", "k=range(0, 3)", "name=a,b",
            "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=3", "hydra.sweeper.sampler=random",
            "hydra.sweeper.seed=0"]
    sweep(app, *args)
    first = load(app).trials
    assert [t.number for t in first] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in first)
    sweep(app, *args)  # the same command again: 4 more trials in the same study
    trials = load(app).trials
    assert [t.number for t in trials] == list(range(8))
    assert {t.params["x"] for t in trials[4:]}.isdisjoint({t.params["x"] for t in first})
    for trial in trials:  # the trial ran in sweep/<number>, with its own parameters
        run_dir = Path(trial.user_attrs["run_dir"])
        assert run_dir == tmp_path / "sweep" / str(trial.number)
        seen = json.loads((run_dir / "seen.json").read_text())
        assert seen == {key: trial.params[key] for key in ("x", "k", "name")}
        assert trial.value == pytest.approx((math.log10(seen["x"]) + 2) ** 2 + seen["k"])
    results = (tmp_path / "sweep" / "optuna_results.yaml").read_text()
    best = min(trials, key=lambda t: t.value)
    assert f"number: {best.number}\n" in results and "trials: 8\n" in results
    sweep(app, *args, "hydra.sweeper.max_trials=10")  # a cap on the total
    assert len(load(app).trials) == 10


def test_diverged_and_crashed_trials(tmp_path):
    app = make_app(tmp_path)
    grid = "x=choice(0.001, 0.01, 0.1, 1.0)"  # 4 trials of a random sampler cover most of it
    common = [grid, "nan_above=0.05", "crash_above=0.5", "hydra.sweeper.sampler=random",
              "hydra.sweeper.seed=3", "hydra.sweeper.n_trials=8", "hydra.sweeper.n_jobs=4"]
    sweep(app, *common, "hydra.sweeper.study_name=fail")
    sweep(app, *common, "hydra.sweeper.study_name=penalty", "hydra.sweeper.diverged_value=99")
    for name in ("fail", "penalty"):
        trials = load(app, name).trials
        by_x: dict[float, set] = {}
        for t in trials:
            by_x.setdefault(t.params["x"], set()).add((t.state, t.value,
                                                        t.user_attrs.get("failure", "")[:12]))
        assert by_x.keys() >= {0.01, 0.1, 1.0}, by_x  # the seed covers these
        assert by_x[1.0] == {(TrialState.FAIL, None, "RuntimeError")}, by_x  # a crash: FAIL
        assert by_x[0.01] == {(TrialState.COMPLETE, 0.0, "")}
        diverged = {(TrialState.FAIL, None, "diverged: ob")} if name == "fail" else {
            (TrialState.COMPLETE, 99.0, "")}
        assert by_x[0.1] == diverged, by_x
        assert all(t.user_attrs.get("diverged") for t in trials if t.params["x"] == 0.1)


def test_a_search_space_is_required(tmp_path):
    proc = subprocess.run([sys.executable, str(make_app(tmp_path)), "-m", "hydra/sweeper=optuna",
                           "x=0.5"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no search space" in proc.stderr
