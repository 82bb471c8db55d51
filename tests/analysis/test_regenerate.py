"""analysis.regenerate and analysis.studies: planning, sharing runs, up-to-date figures, and
the numbers of FIGURE.json recomputed independently from the run directories it lists."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
    """sweeps/norm_placement.yaml sweeps 3 placements x 6 LRs x 2 seeds: a study that gives one
    LR and one seed keeps the placements only."""
    jobs = S.job_overrides(S.Grid("norm_placement", {"cpu": ("optim.lr=0.5", "trainer.seed=7")}),
                           "cpu")
    assert len(jobs) == 3
    assert all(j[0] == "+sweep=norm_placement" and "optim.lr=0.5" in j and "trainer.seed=7" in j
               for j in jobs)
    assert {o for j in jobs for o in j if o.startswith("model.norm_position=")} == {
        "model.norm_position=pre", "model.norm_position=post", "model.norm_position=sandwich"}


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
            assert seeds in ({"1,2,3"}, {"1"}), (name, seeds)  # one seed: a single example run


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


def _final(losses: list[float], k: int = 20) -> float:
    if not math.isfinite(losses[-1]):
        return math.inf
    tail = [x for x in losses[-k:] if math.isfinite(x)]
    return sum(tail) / len(tail)


def _incidents(steps: list[int], gap: int = 20) -> int:
    count, last = 0, None
    for s in sorted(set(steps)):
        if last is None or s - last > gap:
            count += 1
        last = s
    return count


def recompute(figure_json: Path, from_runs: bool = True) -> None:
    """Check a FIGURE.json against its run directories with code independent of analysis/:
    every listed run exists; each run's final loss, init loss and spike incidents; and the LR
    sensitivity of each (part, group, seed) of an LR grid, where the figure reports one (the
    study's main part in ``numbers``, another part ``p`` in ``numbers[p]``). Without
    ``from_runs`` only the second half: the aggregates from the JSON's per-run values."""
    obj = json.loads(figure_json.read_text())
    root = (figure_json.parent / obj["runs_root"]).resolve()
    grids: dict[tuple[str, str, str], dict[float, list[tuple[float, float]]]] = {}
    for run in obj["runs"]:
        if not from_runs:
            final = math.inf if run["final_loss"] is None else run["final_loss"]
            group = run.get("grid", run.get("variant"))
            if group is not None:
                key = (run.get("part", "main"), group, str(run["seed"]))
                grids.setdefault(key, {}).setdefault(run["lr"], []).append(
                    (final, run["loss_at_init"]))
            continue
        run_dir = root / run["dir"]
        assert (run_dir / "config.yaml").is_file(), run_dir
        records = {}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                records[r["step"]] = r  # the last record of a step counts
        losses = [float(records[s]["loss"]) for s in sorted(records)]
        final = _final(losses)
        init = next(x for x in losses if math.isfinite(x))
        summary = json.loads((run_dir / "summary.json").read_text())
        if isinstance(summary.get("loss_at_init"), float):
            init = summary["loss_at_init"]
        if run["final_loss"] is None:  # JSON null: inf or NaN
            assert not math.isfinite(final)
        else:
            assert run["final_loss"] == pytest.approx(final, rel=1e-9), run_dir
        assert run["loss_at_init"] == pytest.approx(init, rel=1e-9), run_dir
        events = run_dir / "events.jsonl"
        steps = [json.loads(x)["step"] for x in events.read_text().splitlines()
                 if x.strip()] if events.is_file() else []
        assert run["spike_incidents"] == _incidents(steps), run_dir
        group = run.get("grid", run.get("variant"))
        if group is not None:
            key = (run.get("part", "main"), group, str(run["seed"]))
            grids.setdefault(key, {}).setdefault(run["lr"], []).append((final, init))
    numbers = obj["numbers"]
    checked = 0
    for (part, group, seed), grid in grids.items():
        sens = (numbers if part == "main" else numbers.get(part, {})).get("lr_sensitivity", {})
        if group not in sens:
            continue
        finals = {lr: sum(f for f, _ in v) / len(v) for lr, v in grid.items()}
        inits = {lr: sum(i for _, i in v) / len(v) for lr, v in grid.items()}
        best = min(finals.values())
        want = sum(min(finals[lr], inits[lr]) for lr in grid) / len(grid) - best
        assert sens[group]["per_seed"][seed] == pytest.approx(want, rel=1e-9, abs=1e-12), (
            part, group, seed)
        checked += 1
    if numbers.get("lr_sensitivity"):
        assert checked, "no LR sensitivity could be recomputed"


def _config(recipe: str, lr: float, seed: int) -> dict:
    return {"recipe": recipe, "size": "tiny",
            "model": {"hidden_size": 64, "num_layers": 2, "qk_layernorm": False},
            "loss": {"z_loss": 0.0},
            "optim": {"lr": lr, "min_lr": 1e-4, "warmup_steps": 4, "clip_grad": 1.0,
                      "weight_decay": 0.1, "weight_decay_lr_independent": False, "eps": 1e-8},
            "data": {"seq_length": 64},
            "fault": {"at_step": None},
            "trainer": {"train_steps": 40, "seed": seed, "global_batch_size": 8}}


@pytest.fixture
def grid_runs(tmp_path, make_run, make_event):
    """gpt_vs_llama2's runs, synthetic: 2 recipes x 3 LRs x 3 seeds, 40 steps; GPT blows up at
    the largest LR (one seed goes NaN), and some runs have detector events."""
    root = tmp_path / "runs"
    info = {}
    for recipe, base in (("gpt", 6.0), ("llama2", 5.5)):
        for lr in (0.01, 0.1, 1.0):
            for seed in (1, 2, 3):
                d = f"{recipe}-tiny/{recipe}{lr}{seed}"
                losses = [9.0] + [base + 0.1 * seed + 0.3 * abs(math.log10(lr) + 1.5)
                                  - 0.01 * i for i in range(39)]
                events = []
                if recipe == "gpt" and lr == 1.0:
                    losses = losses[:10] + [12.0 + i for i in range(30)]
                    events = [make_event(11, "loss_spike"), make_event(12, "logsumexp_drift"),
                              make_event(35, "loss_spike")]
                    if seed == 3:
                        losses[-1] = math.nan
                make_run(root / d, losses, config=_config(recipe, lr, seed), events=events)
                info[d] = {"part": "main",
                           "overrides": ["+sweep=ablation", f"+sweep/ablation={recipe}",
                                         f"optim.lr={lr:g}", f"trainer.seed={seed}"]}
    return root, info


def _plan(name: str, info: dict) -> S.Plan:
    jobs = {d: S.Job(tuple(v["overrides"]), d, 40, 1.0) for d, v in info.items()}
    return S.Plan("cpu", jobs, {name: info})


def test_figure_json_numbers_are_recomputable_from_its_runs(grid_runs, tmp_path):
    root, info = grid_runs
    out = tmp_path / "figures"
    plan = _plan("gpt_vs_llama2", info)
    data = R.load_dirs(root, list(info))
    obj = R.draw("gpt_vs_llama2", plan, data, root, out)
    assert {p.name for p in out.iterdir()} >= {"gpt_vs_llama2.png", "gpt_vs_llama2.pdf",
                                               "gpt_vs_llama2.json"}
    assert len(obj["runs"]) == 18 and all(r["status"] != "missing" for r in obj["runs"])
    assert obj["verdict"] in ("reproduced", "partly", "not at this scale")
    recompute(out / "gpt_vs_llama2.json")
    # GPT's blow-up costs it stability in every seed: the recomputed grid says so too
    sens = json.loads((out / "gpt_vs_llama2.json").read_text())["numbers"]["lr_sensitivity"]
    assert all(sens["gpt"]["per_seed"][s] > sens["llama2"]["per_seed"][s] for s in "123")


def test_recompute_catches_a_wrong_number(grid_runs, tmp_path):
    root, info = grid_runs
    out = tmp_path / "figures"
    R.draw("gpt_vs_llama2", _plan("gpt_vs_llama2", info), R.load_dirs(root, list(info)), root,
           out)
    path = out / "gpt_vs_llama2.json"
    obj = json.loads(path.read_text())
    obj["numbers"]["lr_sensitivity"]["gpt"]["per_seed"]["2"] += 0.01
    path.write_text(json.dumps(obj))
    with pytest.raises(AssertionError):
        recompute(path)
    obj = json.loads((out / "gpt_vs_llama2.json").read_text())


@pytest.mark.parametrize("name", ["gpt_vs_llama2", "norm_placement", "qk_norm", "z_loss",
                                  "spike_no_more", "adam_eps", "init_std", "width_scaling",
                                  "ablation", "spike_timeline"])
def test_the_committed_cpu_figures_are_recomputable(name):
    """The committed figures' aggregates follow from their per-run values; where the runs they
    list are here too (after `regenerate all`), the per-run values from the run directories."""
    path = S.REPO / "figures" / f"{name}.json"
    obj = json.loads(path.read_text())
    assert obj["runs"] and obj["verdict"] in ("reproduced", "partly", "not at this scale")
    assert len({r["seed"] for r in obj["runs"] if "seed" in r}) >= 3, "at least 3 seeds"
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
