"""Every named study in stability/conf/sweep/ composes: `+sweep=NAME` is found in the package's
config tree, and every job of its multirun (the basic sweeper's grid, or an Optuna search space
at its bounds) gives a valid config. No training: Hydra's compose API and `validate` only."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from stability.config import CONF_DIR, Config, register_configs, validate

SWEEPS = CONF_DIR / "sweep"
STUDIES = sorted(p.stem for p in SWEEPS.glob("*.yaml"))
VARIANTS = sorted(p.stem for p in (SWEEPS / "ablation").glob("*.yaml"))
# The figures of issue "Explain" and the studies the issue "Sweep" asks for.
REQUIRED = {"lr_sensitivity", "norm_placement", "ablation", "gpt_vs_llama2", "qk_norm", "z_loss",
            "spike_no_more", "adam_eps", "init_std", "width_scaling", "lr_search"}
# The recipe table's changes; its LR-and-warmup row is the regime's (the ablation fixes LR, min
# LR and warmup for both recipes), so it is not a variant.
CHANGES = ("rmsnorm", "scaled_embedding", "z_loss", "eps", "init_std", "arch")
MAX_STEPS = 1000  # CPU scale: spike_recovery's 1000 steps are the longest


@pytest.fixture(scope="module")
def hydra_conf():
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


def study(name: str):
    return compose("config", overrides=[f"+sweep={name}"], return_hydra_config=True)


@functools.cache
def job_config(*overrides: str) -> Config:
    """The typed config of one job (cached: composing takes ~0.2-0.5 s)."""
    return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def jobs(node) -> list[list[str]]:
    """Override lists that together use every value of every axis of the study: job i takes
    value i (mod its length) of each axis of the basic sweeper's grid; for Optuna, each search
    dimension at its bounds. (The full grids hold ~300 jobs: too slow to compose in a test.)"""
    parser = OverridesParser.create()
    params = node.hydra.sweeper.params or {}
    overrides = parser.parse_overrides([f"{k}={v}" for k, v in params.items()])
    if node.hydra.sweeper._target_.endswith("BasicSweeper"):
        axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
                if o.is_sweep_override() else [o.input_line] for o in overrides]
        return [[axis[i % len(axis)] for axis in axes] for i in range(max(map(len, axes)))]
    from hydra_plugins.stability_optuna.sweeper import as_override, search_space

    space, fixed = search_space(overrides)
    ends = {k: (d.choices[0], d.choices[-1]) if hasattr(d, "choices") else (d.low, d.high)
            for k, d in space.items()}
    out = [[*fixed, *(as_override(k, lo) for k, (lo, _) in ends.items())]]
    for key, (_, hi) in ends.items():
        out.append([*fixed, *(as_override(k, hi if k == key else lo)
                              for k, (lo, _) in ends.items())])
    return out


def test_the_required_studies_exist():
    assert REQUIRED <= set(STUDIES), REQUIRED - set(STUDIES)
    assert not SWEEPS.is_symlink()  # real files: they go into the wheel


@pytest.mark.parametrize("name", STUDIES)
def test_every_job_of_the_study_composes_and_validates(hydra_conf, name):
    node = study(name)
    text = (SWEEPS / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n"), name
    batch = jobs(node)
    assert len(batch) >= 2, (name, batch)
    seen = set()
    for job in batch:
        cfg = job_config(f"+sweep={name}", *job)
        validate(cfg)
        assert cfg.size == "tiny" and cfg.trainer.train_steps <= MAX_STEPS, (name, job)
        assert cfg.model.hidden_size <= 256 and cfg.model.num_layers <= 4, (name, job)
        seen.add(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    assert len(seen) == len(batch), f"{name}: two jobs compose to the same config"


def test_ablation_changes_one_knob_at_a_time(hydra_conf):
    """gpt+X differs from gpt exactly where llama2-X differs from llama2, and applying every change
    to GPT gives the Llama2 base (so the changes cover the recipe table)."""
    assert set(VARIANTS) == {"gpt", "llama2"} | {f"gpt+{c}" for c in CHANGES} | {
        f"llama2-{c}" for c in CHANGES}
    params = str(study("ablation").hydra.sweeper.params["+sweep/ablation"])
    assert sorted(v.strip() for v in params.split(",")) == VARIANTS

    seeds = dict(job for job in jobs(study("ablation")))  # the jobs the test above composed

    def flat(variant: str) -> dict:
        job = [f"+sweep/ablation={variant}", seeds[f"+sweep/ablation={variant}"]]
        cfg = OmegaConf.structured(job_config("+sweep=ablation", *job))
        values = dict(_flatten(OmegaConf.to_container(cfg, resolve=True)))
        del values["trainer.seed"]
        return values

    base = {r: flat(r) for r in ("gpt", "llama2")}
    assert base["gpt"]["recipe"] == "gpt" and base["llama2"]["recipe"] == "llama2"
    differ = {k for k in base["gpt"] if base["gpt"][k] != base["llama2"][k]} - {"recipe"}
    covered = set()
    for change in CHANGES:
        plus = flat(f"gpt+{change}")
        minus = flat(f"llama2-{change}")
        changed = {k for k in plus if plus[k] != base["gpt"][k]}
        assert changed and changed == {k for k in minus if minus[k] != base["llama2"][k]}, change
        for key in changed:
            assert plus[key] == base["llama2"][key] and minus[key] == base["gpt"][key], key
        assert not covered & changed, change  # one change, one set of knobs
        covered |= changed
    assert covered == differ


def _flatten(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


COMPOSE_ELSEWHERE = """
from hydra import compose, initialize_config_module
from stability.config import CONF_MODULE, register_configs
register_configs()
with initialize_config_module(CONF_MODULE, version_base="1.3"):
    node = compose("config", overrides=["+sweep=lr_search"], return_hydra_config=True)
print(node.hydra.sweeper._target_, node.hydra.sweeper.params["optim.lr"])
"""


def test_plus_sweep_and_the_optuna_plugin_work_from_any_directory(tmp_path):
    """The config tree and its sweeps are found in the package (pkg://stability.conf); Hydra
    finds the sweeper plugin in the installed hydra_plugins namespace (not through the cwd)."""
    proc = subprocess.run([sys.executable, "-c", COMPOSE_ELSEWHERE], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["hydra_plugins.stability_optuna.sweeper.OptunaSweeper",
                                   "tag(log,", "interval(1e-4,", "1.0))"]
