"""analysis.regenerate and analysis.studies: planning, sharing runs, up-to-date figures, and
the numbers of FIGURE.json recomputed independently from the run directories it lists."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from analysis import regenerate as R
from analysis import studies as S


def _study(name: str, *overrides: str, sweep: str | None = None) -> S.Study:
    return S.Study(name, name, "claim", "source", {"main": S.Grid(sweep, {"cpu": overrides})})


@pytest.fixture
def fake_studies(monkeypatch):
    """Replace the studies by the test's own (the registry is a plain dict)."""
    monkeypatch.setattr(S, "STUDIES", {})
    return S.STUDIES


# --- expanding studies ----------------------------------------------------------------------


def test_grid_is_the_product_of_comma_lists_and_later_values_win():
    grid = S.Grid(None, {"cpu": ("trainer.train_steps=10", "optim.lr=0.1,0.2",
                                 "trainer.seed=1,2", "trainer.train_steps=20")})
    jobs = S.job_overrides(grid, "cpu")
    assert len(jobs) == 4
    assert all(j.count("trainer.train_steps=20") == 1 for j in jobs)
    assert not any("trainer.train_steps=10" in j for j in jobs)
    assert {(j[-2], j[-1]) for j in jobs} == {
        (f"optim.lr={lr}", f"trainer.seed={s}") for lr in (0.1, 0.2) for s in (1, 2)}


def test_scale_overrides_replace_the_sweep_files_values():
    """sweeps/norm_placement.yaml sweeps 2 placements x 4 LRs x 3 seeds: a study that gives one
    LR and one seed keeps the placements only."""
    jobs = S.job_overrides(S.Grid("norm_placement", {"cpu": ("optim.lr=0.5", "trainer.seed=7")}),
                           "cpu")
    assert len(jobs) == 2
    assert all(j[0] == "+sweep=norm_placement" and "optim.lr=0.5" in j and "trainer.seed=7" in j
               for j in jobs)
    assert {o for j in jobs for o in j if o.startswith("model.norm_position=")} == {
        "model.norm_position=pre", "model.norm_position=post"}


def test_fast_composition_equals_hydra_compose():
    composer = S.Composer()
    try:
        for job in (["+sweep=ablation", "+sweep/ablation=llama2-eps", "optim.lr=0.03",
                     "trainer.train_steps=50", "data.seq_length=64"],
                    ["recipe=gpt", "model.norm_position=post", "optim.min_lr=1e-4"],
                    ["+sweep=gpt_vs_llama2", "recipe=llama2", "trainer.train_steps=100",
                     "optim.weight_decay_lr_independent=true"]):
            common = list(S.SCALES["cpu"].common)
            assert composer([*common, *job]) == composer([*common, *job], full=True), job
    finally:
        composer.close()


def test_run_identity_ignores_what_does_not_change_a_run():
    config = {"optim": {"lr": 0.1}, "trainer": {"seed": 1, "threads": 1},
              "logger": {"console": True}, "checkpoint": {"interval": 10}}
    same = {**config, "trainer": {"seed": 1, "threads": 2}, "logger": {"console": False},
            "checkpoint": {"interval": 0}}
    other = {**config, "optim": {"lr": 0.2}}
    assert S.run_identity(config) == S.run_identity(same) != S.run_identity(other)
    # A key at the schema's default (a knob added after the run) does not change the identity;
    # the same key at another value does.
    eps = S._schema_defaults()["optim.eps"]
    with_default = {**config, "optim": {"lr": 0.1, "eps": eps}}
    with_other = {**config, "optim": {"lr": 0.1, "eps": eps * 10}}
    assert S.run_identity(with_default) == S.run_identity(config) != S.run_identity(with_other)


def test_a_run_two_studies_need_is_planned_once_and_the_plan_is_cached(fake_studies, tmp_path,
                                                                        monkeypatch):
    base = ("trainer.train_steps=5", "data.seq_length=32")
    # the same run spelt two ways: recipe=llama2 is the default
    fake_studies["a"] = _study("a", *base, "optim.lr=0.01,0.02")
    fake_studies["b"] = _study("b", *base, "recipe=llama2", "optim.lr=0.02,0.04")
    plan = S.plan(["a", "b"], "cpu", tmp_path)
    assert len(plan.jobs) == 3
    assert set(plan.studies["a"]) & set(plan.studies["b"])
    assert list((tmp_path / ".plans").glob("cpu-*.json"))

    def no_compose(*args, **kwargs):
        raise AssertionError("the cached plan should have been used")

    monkeypatch.setattr(S, "Composer", no_compose)
    assert S.plan(["a", "b"], "cpu", tmp_path).studies == plan.studies


def test_every_figure_has_a_study_at_both_scales_and_3_seeds():
    from analysis.figures import FIGURES

    assert set(S.study_names()) == set(FIGURES)
    for name in S.study_names():
        study = S.get(name)
        assert {"cpu", "gpu"} <= study.scales(), name
        for grid in study.grids.values():
            seeds = {o.split("=", 1)[1] for o in grid.scales["cpu"] if o.startswith("trainer.seed")}
            # one seed: a single example run; five: the headline comparison
            assert seeds in ({"1,2,3"}, {"1,2,3,4,5"}, {"1"}), (name, seeds)


def test_jobs_file_errors_name_the_job(tmp_path):
    from hydra.errors import HydraException

    from hydra_plugins.stability_jobs.sweeper import read_jobs

    path = tmp_path / "jobs.json"
    path.write_text(json.dumps([{"subdir": "a/1", "overrides": ["x=1"]}, {"subdir": "b"}]))
    with pytest.raises(HydraException, match="job 1"):
        read_jobs(path)
    path.write_text(json.dumps([{"subdir": "a/1", "overrides": ["x=1"]}]))
    assert read_jobs(path) == [("a/1", ["x=1"])]


# --- recomputing a figure's numbers from its run directories ----------------------------------

ALPHA, MARGIN = 0.05, 1.0  # docs/findings.md: the verdict's level and the testability margin


def _incidents(steps: list[int], gap: int = 20) -> int:
    count, last = 0, None
    for s in sorted(set(steps)):
        if last is None or s - last > gap:
            count += 1
        last = s
    return count


def _by_kind(events: list[dict]) -> dict[str, int]:
    """docs/analysis.md: incidents of non-finite values, leading alerts, grad-norm spikes and
    loss spikes (every other spike event), each merged apart."""
    steps: dict[str, list[int]] = {"num_nonfinite": [], "num_leading": [], "num_grad_spikes": [],
                                   "num_loss_spikes": []}
    for e in events:
        if e.get("kind") == "nonfinite":
            steps["num_nonfinite"].append(e["step"])
        elif e.get("kind") == "leading":
            steps["num_leading"].append(e["step"])
        elif str(e.get("metric", "")).startswith("grad_norm"):
            steps["num_grad_spikes"].append(e["step"])
        else:
            steps["num_loss_spikes"].append(e["step"])
    return {k: _incidents(v) for k, v in steps.items()}


def _from_run_dir(run_dir: Path, unigram: float) -> dict:
    """A run's held-out loss, peak training loss, divergence and incidents, read directly."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            records[r["step"]] = r  # the last record of a step counts
    losses = [float(records[s]["loss"]) for s in sorted(records) if "loss" in records[s]]
    summary = json.loads((run_dir / "summary.json").read_text())
    held = summary.get("eval_loss")
    if not isinstance(held, float) or not math.isfinite(held):
        evals = [records[s]["eval_loss"] for s in sorted(records) if "eval_loss" in records[s]]
        held = float(evals[-1]) if evals else math.nan
    finite = [x for x in losses if math.isfinite(x)]
    nonfinite = len(finite) < len(losses)
    diverged = (summary.get("status") == "diverged" or nonfinite
                or (not math.isnan(held) and not held <= unigram))
    events = run_dir / "events.jsonl"
    evs = [json.loads(x) for x in events.read_text().splitlines() if x.strip()] \
        if events.is_file() else []
    return {"eval_loss": held, "peak_loss": max(finite) if finite else math.nan,
            "diverged": diverged, **_by_kind(evs)}


def _combine(verdicts: list[str]) -> str:
    tested = [v for v in verdicts if v != "untestable at this scale"]
    if not tested:
        return "untestable at this scale"
    if all(v == "reproduced" for v in tested):
        return "reproduced"
    return "not reproduced" if all(v == "not reproduced" for v in tested) else "partly"


VERDICTS = ("reproduced", "partly", "not reproduced", "untestable at this scale",
            "engineering check: passed", "engineering check: failed")


def recompute(figure_json: Path, from_runs: bool = True) -> None:
    """Check a FIGURE.json against its run directories with code independent of analysis/:
    every listed run exists; each run's held-out loss, peak loss, divergence and incidents by
    kind; each arm's best held-out loss; the LR sensitivity (capped at the unigram level) of
    each (part, group, seed) of an LR grid where the figure reports one (the study's main part
    in ``numbers``, another part ``p`` in ``numbers[p]``); that no comparison counted as
    testable has an arm whose best run is not 1 nat below the unigram level; and the verdicts.
    Without ``from_runs``: everything but the per-run values, from the JSON's per-run values."""
    obj = json.loads(figure_json.read_text())
    root = (figure_json.parent / obj["runs_root"]).resolve()
    unigram = obj["levels"]["unigram"]
    assert obj["levels"]["margin_nats"] == MARGIN and obj["levels"]["bigram"] < unigram
    grids: dict[tuple[str, str, str], dict[float, list[float]]] = {}
    best: dict[str, float] = {}
    for run in obj["runs"]:
        assert run["status"] != "missing", run["dir"]
        assert run["unigram"] == pytest.approx(unigram), run["dir"]
        if from_runs:
            got = _from_run_dir(root / run["dir"], unigram)
            for key, value in got.items():
                if isinstance(value, float) and math.isnan(value):
                    assert run[key] is None, (run["dir"], key)
                elif isinstance(value, float):
                    assert run[key] == pytest.approx(value, rel=1e-9), (run["dir"], key)
                else:
                    assert run[key] == value, (run["dir"], key)
        held = math.nan if run["eval_loss"] is None else run["eval_loss"]
        arm = run.get("grid", run.get("variant"))
        if arm is not None and math.isfinite(held):
            best[arm] = min(best.get(arm, math.inf), held)
        if arm is not None and "lr" in run:
            capped = min(held if math.isfinite(held) else math.inf, unigram)
            key = (run.get("part", "main"), arm, str(run["seed"]))
            grids.setdefault(key, {}).setdefault(run["lr"], []).append(capped)
    numbers = obj["numbers"]
    checked = 0
    for (part, group, seed), grid in grids.items():
        sens = (numbers if part == "main" else numbers.get(part, {})).get("lr_sensitivity", {})
        if group not in sens or len(grid) < 2:
            continue
        means = {lr: sum(v) / len(v) for lr, v in grid.items()}
        want = sum(means.values()) / len(means) - min(means.values())
        assert sens[group]["per_seed"][seed] == pytest.approx(want, rel=1e-9, abs=1e-12), (
            part, group, seed)
        checked += 1
    if numbers.get("lr_sensitivity") and any(len(g) > 1 for g in grids.values()):
        assert checked, "no LR sensitivity could be recomputed"
    for name, arm in obj["arms"].items():
        if name not in best:  # no run of the arm reached its evaluation (stopped, diverged)
            assert arm["best_eval_loss"] is None, name
            continue
        assert arm["best_eval_loss"] == pytest.approx(best[name], rel=1e-9), name
    for key, test in obj["tests"].items():
        if test["verdict"] == "untestable at this scale":
            continue
        for name in test["arms"]:
            assert best[name] <= unigram - MARGIN, (key, name, best[name], unigram)
        rule = (test["p"] <= ALPHA + 1e-9) if test.get("kind") == "counts" else (
            test["p"] < ALPHA)
        assert test["verdict"] == ("reproduced" if rule else "not reproduced"), key
    assert obj["verdict"] in VERDICTS
    if obj["tests"]:
        assert obj["verdict"] == _combine([t["verdict"] for t in obj["tests"].values()])
    assert {"lrs", "points", "decades"} <= set(obj["grid"])


def _config(recipe: str, lr: float, seed: int) -> dict:
    return {"recipe": recipe, "size": "tiny",
            "model": {"hidden_size": 64, "num_layers": 2, "qk_layernorm": False},
            "loss": {"z_loss": 0.0},
            "optim": {"lr": lr, "min_lr": 1e-4, "warmup_steps": 4, "clip_grad": 1.0,
                      "weight_decay": 0.1, "weight_decay_lr_independent": False, "eps": 1e-8},
            "data": {"seq_length": 64, "tokenizer": "sample-2k"},
            "fault": {"at_step": None},
            "trainer": {"train_steps": 40, "seed": seed, "global_batch_size": 8}}


@pytest.fixture
def grid_runs(tmp_path, make_run, make_event):
    """gpt_vs_llama2's runs, synthetic: 2 recipes x 3 LRs x 3 seeds, 40 steps, with a held-out
    loss (the 2k tokenizer: unigram level ~6.33); GPT blows up at the largest LR (one seed goes
    NaN), and some runs have detector events of every kind."""
    root = tmp_path / "runs"
    info = {}
    for recipe, base in (("gpt", 4.9), ("llama2", 4.2)):
        for lr in (0.01, 0.1, 1.0):
            for seed in (1, 2, 3):
                d = f"{recipe}-tiny/{recipe}{lr}{seed}"
                held = base + 0.1 * seed + 0.3 * abs(math.log10(lr) + 1.5)
                losses = [7.6] + [held + 0.2 - 0.01 * i for i in range(39)]
                events = []
                if recipe == "gpt" and lr == 1.0:
                    losses = losses[:10] + [12.0 + i for i in range(30)]
                    held = 7.5
                    events = [make_event(11, "loss_spike"),
                              make_event(12, "logsumexp_drift", kind="leading"),
                              {**make_event(13, "grad_zscore"), "metric": "grad_norm"},
                              make_event(35, "loss_spike")]
                    if seed == 3:
                        losses[-1] = math.nan
                        held = math.nan
                        events.append(make_event(39, "nonfinite", kind="nonfinite"))
                status = "diverged" if math.isnan(held) else "completed"
                make_run(root / d, losses, config=_config(recipe, lr, seed), events=events,
                         summary={"status": status, "final_loss": losses[-1], "steps": 40,
                                  "eval_loss": held, "cpu_seconds": 30.0})
                info[d] = {"part": "main",
                           "overrides": ["+sweep=ablation", f"+sweep/ablation={recipe}",
                                         f"optim.lr={lr:g}", f"trainer.seed={seed}"]}
    return root, info


def _plan(name: str, info: dict) -> S.Plan:
    jobs = {d: S.Job(tuple(v["overrides"]), d, 40, 1.0) for d, v in info.items()}
    return S.Plan("cpu", jobs, {name: info})


def test_loading_in_two_processes_gives_the_same_tables(grid_runs):
    root, info = grid_runs
    one, two = R.load_dirs(root, list(info), jobs=1), R.load_dirs(root, list(info), jobs=2)
    assert len(one.runs) == 18 and len(one.events) > 0
    for a, b in ((one.runs, two.runs), (one.metrics, two.metrics), (one.events, two.events)):
        pd.testing.assert_frame_equal(a, b)


def test_figure_json_numbers_are_recomputable_from_its_runs(grid_runs, tmp_path):
    root, info = grid_runs
    out = tmp_path / "figures"
    plan = _plan("gpt_vs_llama2", info)
    data = R.load_dirs(root, list(info))
    obj = R.draw("gpt_vs_llama2", plan, data, root, out)
    assert {p.name for p in out.iterdir()} >= {"gpt_vs_llama2.png", "gpt_vs_llama2.pdf",
                                               "gpt_vs_llama2.json"}
    assert len(obj["runs"]) == 18 and all(r["status"] != "missing" for r in obj["runs"])
    recompute(out / "gpt_vs_llama2.json")
    # GPT's blow-up costs it stability in every seed, and Llama2 learns better: both tests
    # are testable (both recipes' best runs are >1 nat below the unigram level), 3/3 seeds
    obj = json.loads((out / "gpt_vs_llama2.json").read_text())
    sens = obj["numbers"]["lr_sensitivity"]
    assert all(sens["gpt"]["per_seed"][s] > sens["llama2"]["per_seed"][s] for s in "123")
    assert obj["tests"]["lr_sensitivity_llama2_lower"]["detail"].startswith("3/3")
    assert obj["levels"]["unigram"] == pytest.approx(6.33, abs=0.1)
    assert obj["cost"]["core_minutes"] == pytest.approx(18 * 30 / 60)
    assert 0 < obj["false_positive_rate"]["reproduced"] < 0.05
    by_dir = {r["dir"]: r for r in obj["runs"]}
    blew = by_dir["gpt-tiny/gpt1.03"]
    assert (blew["num_loss_spikes"], blew["num_leading"], blew["num_grad_spikes"],
            blew["num_nonfinite"], blew["diverged"]) == (2, 1, 1, 1, True)


def test_a_run_above_the_unigram_level_makes_its_arm_untestable(grid_runs, tmp_path):
    """Raise every GPT held-out loss to 0.5 nat below the unigram level: GPT no longer learns
    enough for a comparison with it to mean anything, and the figure says so."""
    root, info = grid_runs
    for d in info:
        if d.startswith("gpt"):
            path = root / d / "summary.json"
            summary = json.loads(path.read_text())
            if isinstance(summary["eval_loss"], float) and summary["eval_loss"] < 7:
                summary["eval_loss"] = 5.85 + 0.01 * len(d)
            path.write_text(json.dumps(summary))
    out = tmp_path / "figures"
    obj = R.draw("gpt_vs_llama2", _plan("gpt_vs_llama2", info), R.load_dirs(root, list(info)),
                 root, out)
    assert obj["verdict"] == "untestable at this scale"
    assert all(t["verdict"] == "untestable at this scale" for t in obj["tests"].values())
    recompute(out / "gpt_vs_llama2.json")


def test_recompute_catches_a_wrong_number(grid_runs, tmp_path):
    root, info = grid_runs
    out = tmp_path / "figures"
    R.draw("gpt_vs_llama2", _plan("gpt_vs_llama2", info), R.load_dirs(root, list(info)), root,
           out)
    path = out / "gpt_vs_llama2.json"
    good = path.read_text()
    for edit in (lambda o: o["numbers"]["lr_sensitivity"]["gpt"]["per_seed"].update(
                     {"2": o["numbers"]["lr_sensitivity"]["gpt"]["per_seed"]["2"] + 0.01}),
                 lambda o: o["runs"][0].update(eval_loss=o["runs"][0]["eval_loss"] + 0.01),
                 lambda o: o["arms"]["gpt"].update(best_eval_loss=4.0),
                 lambda o: o.update(verdict="reproduced" if o["verdict"] != "reproduced"
                                    else "partly")):
        obj = json.loads(good)
        edit(obj)
        path.write_text(json.dumps(obj))
        with pytest.raises(AssertionError):
            recompute(path)


FIGURE_NAMES = ["gpt_vs_llama2", "norm_placement", "qk_norm", "z_loss", "spike_no_more",
                "adam_eps", "init_std", "width_scaling", "ablation", "spike_recovery",
                "spike_timeline"]


@pytest.mark.parametrize("name", FIGURE_NAMES)
def test_the_committed_cpu_figures_are_recomputable(name):
    """The committed figures' aggregates follow from their per-run values; where the runs they
    list are here too (after `regenerate all`), the per-run values from the run directories."""
    path = S.REPO / "figures" / f"{name}.json"
    obj = json.loads(path.read_text())
    assert obj["runs"]
    seeds = {r["seed"] for r in obj["runs"] if "seed" in r}
    assert len(seeds) >= (5 if name == "gpt_vs_llama2" else 3), seeds
    root = (path.parent / obj["runs_root"]).resolve()
    runs_here = all((root / r["dir"] / "metrics.jsonl").is_file() for r in obj["runs"])
    recompute(path, from_runs=runs_here)


# --- the command ------------------------------------------------------------------------------


def test_up_to_date_figures_are_not_redrawn(grid_runs, tmp_path, fake_studies):
    root, info = grid_runs
    fake_studies["gpt_vs_llama2"] = _study("gpt_vs_llama2", "trainer.seed=1")
    plan = _plan("gpt_vs_llama2", info)
    out = tmp_path / "figures"
    sources = R._source_digest()
    fps = {"gpt_vs_llama2": R.fingerprint("gpt_vs_llama2", plan, root, sources)}
    assert not R.up_to_date("gpt_vs_llama2", out, fps["gpt_vs_llama2"])
    assert R.draw_all(["gpt_vs_llama2"], plan, root, out, fps, jobs=1)[0][1] != "error"
    assert R.up_to_date("gpt_vs_llama2", out, fps["gpt_vs_llama2"])
    # a run that changes makes it stale
    run = next(iter(info))
    with (root / run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 41, "loss": 5.0}) + "\n")
    assert R.fingerprint("gpt_vs_llama2", plan, root, sources) != fps["gpt_vs_llama2"]


def test_unknown_figure_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as err:
        R.main(["no_such_figure", "--dry-run"])
    assert err.value.code == 2
    assert "unknown figure no_such_figure" in capsys.readouterr().err


@pytest.mark.slow
def test_regenerate_trains_missing_runs_then_is_fast(fake_studies, tmp_path):
    """A fake study of two 5-step runs: the first call trains them (hydra/sweeper=jobs on the
    local launcher) and draws; the second finds everything there and up to date."""
    import time

    fake_studies["gpt_vs_llama2"] = _study(
        "gpt_vs_llama2", "trainer.train_steps=5", "data.seq_length=32", "optim.lr=0.01",
        "trainer.seed=1", "recipe=gpt,llama2")
    runs, out = tmp_path / "runs", tmp_path / "figures"
    said: list[str] = []
    argv = ["gpt_vs_llama2", "--runs", str(runs), "--out", str(out)]
    assert R.main(argv, say=said.append) == 0, said
    assert any("2 to train" in s for s in said), said
    obj = json.loads((out / "gpt_vs_llama2.json").read_text())
    assert len(obj["runs"]) == 2 and all(r["status"] == "completed" for r in obj["runs"])
    assert (out / "gpt_vs_llama2.png").stat().st_size > 10_000
    recompute(out / "gpt_vs_llama2.json")
    said.clear()
    start = time.monotonic()
    assert R.main(argv, say=said.append) == 0
    assert time.monotonic() - start < 10
    assert any("0 to train" in s for s in said) and any("up to date" in s for s in said), said
