"""The paper figures' studies: which sweep each runs, at which scale, and what it claims.

A study has one or more parts; a part is a named sweep of ``stability/conf/sweep/``
(``+sweep=NAME``) plus, per scale, the overrides that size it (seeds, LR grid, steps, regime):
Hydra's override grammar, comma lists swept as the basic sweeper sweeps them (a key swept in the
sweep file and given here takes the value given here).

:func:`plan` expands every study into jobs, composes each job's config (:class:`Composer`), and
names its run directory after the resolved config (a hash), so that a run two studies need (the
GPT baseline of ``gpt_vs_llama2``, ``qk_norm``, ``norm_placement``, ...) is trained once. A plan
of ~400 jobs takes ~15 s of CPU to compose, so it is cached under ``<runs>/.plans/``, keyed by the
contents of ``stability/conf/`` (the sweeps included), the config schema and the study
definitions below.

This module composes configs (Hydra, ``stability.config``) but never imports the training loop
or torch; the figures (:mod:`analysis.figures`) read only run directories.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
"""The checkout (or site-packages, installed): ``stability/`` and ``analysis/`` are under it."""
CONF_DIR = REPO / "stability" / "conf"
"""The config tree (``stability.config.CONF_DIR``, without importing it)."""
SWEEPS_DIR = CONF_DIR / "sweep"

# --- scales ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """Where and how big: overrides every run of the scale gets, and how runs are launched.

    Attributes:
        name: ``cpu`` or ``gpu``.
        common: Overrides of every run (thread count, device, no checkpoints, quiet console).
        launcher: Hydra overrides of the multirun that trains missing runs (the default
            launcher; ``--launcher`` replaces it).
        env: Environment of the training processes.
    """

    name: str
    common: tuple[str, ...]
    launcher: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)


# glibc returns freed blocks above 128 KiB-32 MiB to the kernel at once, so every step maps and
# zero-fills the (vocab x tokens) logits buffers again: with these, a tiny CPU run spent 1.5 s
# instead of 16 s of 46 s of CPU in the kernel (60 steps, measured here).
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
    "MALLOC_TOP_PAD_": str(1 << 28),
}
_QUIET = ("logger.console=false", "logger.wandb.mode=disabled", "checkpoint.interval=0",
          "checkpoint.save_final=false")

SCALES = {
    # Two single-threaded runs at a time on a 2-core machine.
    "cpu": Scale("cpu", ("trainer.device=cpu", "trainer.threads=1", *_QUIET),
                 ("hydra/launcher=local", "hydra.launcher.n_jobs=2"), MALLOC_ENV),
    # One H100: eight small runs share it (one alone leaves it mostly idle: launch-bound).
    "gpu": Scale("gpu", ("trainer.device=cuda", *_QUIET),
                 ("hydra/launcher=local", "hydra.launcher.n_jobs=8")),
}

KEY_EXCLUDED = ("logger", "checkpoint", "trainer.threads", "hydra")
"""Config keys that do not change what a run computes: left out of the run's identity."""

# --- studies --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """One sweep of a study: a sweep file of ``stability/conf/sweep/`` and, per scale, the
    overrides that size it (override grammar; comma lists are swept, a key the sweep file sweeps
    takes the value given here). ``sweep=None``: the overrides alone define the grid."""

    sweep: str | None
    scales: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class Study:
    """One paper figure: its sweeps, and the published claim it tests.

    Attributes:
        name: Figure name (``FIGURE.png``).
        title: One line: what the figure shows.
        claim: The published claim, in one or two sentences.
        source: Where it was claimed.
        grids: Part name -> :class:`Grid`; most studies have one part, ``main``.
    """

    name: str
    title: str
    claim: str
    source: str
    grids: Mapping[str, Grid]

    def scales(self) -> set[str]:
        """Scales every part of the study is defined for."""
        return set.intersection(*(set(g.scales) for g in self.grids.values()))


STUDIES: dict[str, Study] = {}


def _add(study: Study) -> None:
    STUDIES[study.name] = study


def study_names() -> list[str]:
    """Names of the studies, in the order of the paper."""
    return list(STUDIES)


def get(name: str) -> Study:
    """The study of a figure; ``KeyError`` naming the known ones if there is none."""
    try:
        return STUDIES[name]
    except KeyError:
        raise KeyError(f"no study {name!r}; known: {', '.join(STUDIES)}") from None


# --- expanding a study into jobs ------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One run a study needs: its overrides (as launched) and its run directory (relative)."""

    overrides: tuple[str, ...]
    subdir: str
    steps: int
    cost: float
    """Relative cost (steps x tokens x a width factor), to launch the longest runs first."""


def _sweep_params(sweep: str | None) -> dict[str, str]:
    """``hydra.sweeper.params`` of a sweep file, as ``key -> value string``."""
    if sweep is None:
        return {}
    from omegaconf import OmegaConf

    node = OmegaConf.load(SWEEPS_DIR / f"{sweep}.yaml")
    params = OmegaConf.select(node, "hydra.sweeper.params") or {}
    return {str(k): str(v) for k, v in params.items()}


def _parse(overrides: Sequence[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def job_overrides(grid: Grid, scale: str) -> list[list[str]]:
    """The override lists of a grid's jobs at a scale (the basic sweeper's grid semantics).

    The sweep file's swept parameters, updated by the scale's overrides of the same keys, form
    the grid; the scale's other overrides are given to every job.
    """
    if scale not in grid.scales:
        raise KeyError(f"sweep {grid.sweep!r} has no {scale!r} scale")
    params = _sweep_params(grid.sweep)
    extra = _parse(grid.scales[scale])
    fixed: dict[str, str] = {}  # a key given twice takes the later value
    for o in extra:
        key = o.get_key_element()
        if o.is_sweep_override() or key in params:
            params[key] = o.input_line.split("=", 1)[1]
            fixed.pop(key, None)
        else:
            fixed[key] = o.input_line
    axes = []
    for o in _parse([f"{k}={v}" for k, v in params.items()]):
        if o.is_sweep_override():
            axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    head = [f"+sweep={grid.sweep}"] if grid.sweep else []
    return [[*head, *fixed.values(), *job] for job in itertools.product(*axes)]


def _drop(config: dict[str, Any], dotted: str) -> None:
    node = config
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.get(p, {})
        if not isinstance(node, dict):
            return
    node.pop(last, None)


def run_identity(config: Mapping[str, Any]) -> str:
    """The identity of a run: a hash of its resolved config without :data:`KEY_EXCLUDED` and
    without the values that equal the config schema's defaults.

    Leaving the defaults out keeps a run's identity when the schema gains a key whose default
    keeps the old behaviour (a new knob), so finished runs are not retrained for it.
    """
    config = json.loads(json.dumps(config, sort_keys=True, default=str))
    for key in KEY_EXCLUDED:
        _drop(config, key)
    defaults = _schema_defaults()
    differing = {k: v for k, v in _leaves(config) if k not in defaults or defaults[k] != v}
    text = json.dumps(differing, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _leaves(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


_DEFAULTS: dict[str, Any] | None = None


def _schema_defaults() -> dict[str, Any]:
    """Dotted key -> default of ``stability.config.Config`` (JSON-normalised), computed once."""
    global _DEFAULTS
    if _DEFAULTS is None:
        from omegaconf import OmegaConf

        from stability.config import Config

        tree = OmegaConf.to_container(OmegaConf.structured(Config), resolve=False,
                                      throw_on_missing=False)
        _DEFAULTS = dict(_leaves(json.loads(json.dumps(tree, default=str))))
    return _DEFAULTS


def _job(overrides: list[str], config: Mapping[str, Any]) -> Job:
    m, t, d = config["model"], config["trainer"], config["data"]
    steps = int(t["train_steps"])
    tokens = int(t["global_batch_size"]) * int(d["seq_length"])
    width = int(m["hidden_size"]) * (1 + int(m["num_layers"]) / 8)
    subdir = f"{config['recipe']}-{config['size']}/{run_identity(config)}"
    return Job(tuple(overrides), subdir, steps, steps * tokens * width)


class Composer:
    """Composes configs with Hydra (``stability.config``'s tree, ``+sweep=NAME`` from its
    ``sweep/`` group).

    Hydra composes the defaults list (recipe, size, sweep files) and then applies each plain
    ``key=value`` override with ``OmegaConf.update``. Jobs of a study differ mostly in plain
    values, so the defaults-list part is composed once per distinct set of group overrides and
    the values are applied here the way Hydra applies them: ~10x faster for a whole plan
    (Hydra's compose takes ~0.2 s of CPU per job). A test checks both give the same config.
    """

    def __init__(self) -> None:
        from hydra import initialize_config_dir

        from stability.config import CONF_DIR, register_configs

        register_configs()
        self.conf_dir = Path(CONF_DIR)
        self._ctx = initialize_config_dir(str(CONF_DIR), version_base="1.3")
        self._ctx.__enter__()
        self._bases: dict[tuple[str, ...], Any] = {}

    def _plain(self, override: Any) -> bool:
        """A ``key=value`` override of a config value (not a config group, not +/~/++)."""
        from hydra.core.override_parser.types import OverrideType

        key = override.key_or_group
        return (override.type == OverrideType.CHANGE and override.package is None
                and not override.is_sweep_override() and "/" not in key
                and not (self.conf_dir / key).is_dir())

    def __call__(self, overrides: Sequence[str], *, full: bool = False) -> dict[str, Any]:
        """The resolved config of ``python -m stability.train OVERRIDES``; ``full``: compose
        everything with Hydra (the reference)."""
        from hydra import compose
        from omegaconf import OmegaConf

        if full:
            node = compose("config", overrides=list(overrides))
            return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
        groups, values = [], []
        for o in _parse(overrides):
            (values if self._plain(o) else groups).append(o)
        key = tuple(o.input_line for o in groups)
        if key not in self._bases:
            self._bases[key] = compose("config", overrides=list(key))
        node = copy.deepcopy(self._bases[key])
        for o in values:
            OmegaConf.update(node, o.key_or_group, o.value(), merge=True)
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)


# --- the plan -------------------------------------------------------------------------------


@dataclass
class Plan:
    """The jobs of some studies at one scale.

    Attributes:
        scale: Scale name.
        jobs: Every distinct run, by run directory (relative to the runs root).
        studies: Study name -> its run directories, each with the study's part and the
            overrides the study gave it (``{"part": str, "overrides": [str]}``). A shared run
            was launched with the overrides of the first study that needed it (``jobs``).
    """

    scale: str
    jobs: dict[str, Job]
    studies: dict[str, dict[str, dict[str, Any]]]

    def to_json(self) -> dict[str, Any]:
        return {"scale": self.scale, "studies": self.studies,
                "jobs": {k: {"overrides": list(j.overrides), "steps": j.steps, "cost": j.cost}
                         for k, j in self.jobs.items()}}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Plan:
        jobs = {k: Job(tuple(v["overrides"]), k, int(v["steps"]), float(v["cost"]))
                for k, v in obj["jobs"].items()}
        return cls(obj["scale"], jobs, {k: dict(v) for k, v in obj["studies"].items()})


def _files_digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha1()
    for path in sorted(paths):
        h.update(path.relative_to(REPO).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def plan_digest(names: Sequence[str], scale: str) -> str:
    """Hash of everything a plan depends on: config tree, sweeps, schema, study definitions."""
    files = [*CONF_DIR.rglob("*.yaml"), REPO / "stability" / "config.py",
             REPO / "stability" / "data" / "config.py"]
    h = hashlib.sha1(_files_digest(p for p in files if p.is_file()).encode())
    h.update(json.dumps([SCALES[scale].common, *(
        [n, {k: [g.sweep, list(g.scales[scale])] for k, g in STUDIES[n].grids.items()}]
        for n in names)]).encode())
    return h.hexdigest()[:16]


def plan(names: Sequence[str], scale: str, runs_root: str | os.PathLike | None = None,
         progress: Any = None) -> Plan:
    """Expand studies into jobs and name their run directories (cached under runs_root).

    Args:
        names: Study names.
        scale: ``cpu`` or ``gpu``.
        runs_root: Where the plan cache lives (``<runs_root>/.plans/``); None = no cache.
        progress: Called with a message while composing (it takes seconds).
    """
    for name in names:
        if scale not in get(name).scales():
            raise KeyError(f"study {name!r} is not defined at scale {scale!r}")
    cache = None
    if runs_root is not None:
        cache = Path(runs_root) / ".plans" / f"{scale}-{plan_digest(names, scale)}.json"
        if cache.is_file():
            return Plan.from_json(json.loads(cache.read_text()))
    common = list(SCALES[scale].common)
    per_study = {n: [(part, o) for part, grid in STUDIES[n].grids.items()
                     for o in job_overrides(grid, scale)] for n in names}
    distinct = list(dict.fromkeys(tuple(o) for jobs in per_study.values() for _, o in jobs))
    if progress:
        progress(f"composing {len(distinct)} configs ({', '.join(names)})")
    composer = Composer()
    try:
        made = {o: _job(list(o), composer([*common, *o])) for o in distinct}
    finally:
        composer.close()
    jobs: dict[str, Job] = {}
    studies: dict[str, dict[str, dict[str, Any]]] = {}
    for name, overrides in per_study.items():
        dirs: dict[str, dict[str, Any]] = {}
        for part, o in overrides:
            job = made[tuple(o)]
            jobs.setdefault(job.subdir, job)
            dirs.setdefault(job.subdir, {"part": part, "overrides": list(o)})
        studies[name] = dirs
    result = Plan(scale, jobs, studies)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_json(), indent=1))
        os.replace(tmp, cache)
    return result


# --- the studies ----------------------------------------------------------------------------


def _lrs(*values: float) -> str:
    return "optim.lr=" + ",".join(f"{v:g}" for v in values)


SEEDS = "trainer.seed=1,2,3"
SEEDS5 = "trainer.seed=1,2,3,4,5"

# CPU: the study shape (size=study: d=128, 4 layers, 4 heads, the 2048-entry tokenizer, batch
# 8 x 128 tokens), 400 steps, warmup 10%, a cosine that ends at LR/10 at the run's end, held-out
# loss at the end (24 global batches: the same 24,576 held-out tokens for every run). Calibration
# (docs/findings.md): GPT's held-out loss is best at LR 1e-2 (5.24 nats), Llama2's at 3e-3 (3.75);
# the corpus's unigram level is 6.33, its bigram level 3.79. About a core-minute a run.
CPU = ("size=study", "trainer.train_steps=400", "trainer.eval_batches=24")
CPU_GRID = _lrs(1e-3, 3e-3, 1e-2, 3e-2)  # 1.5 decades; both recipes' optima inside
# The regime that separates the recipes (the second pilot's, DESIGN.md): no clipping, weight
# decay 1e-4 independent of the peak LR, LR 0.3. The min LR and warmup are spelled out so that
# the ablation's bases (whose files set neither) are these runs.
SEPARATING = ("optim.lr=0.3", "optim.clip_grad=0", "optim.weight_decay=1e-4",
              "optim.weight_decay_lr_independent=true",
              "optim.min_lr='${times:${optim.lr},0.1}'",
              "optim.warmup_steps='${steps_fraction:${trainer.train_steps},0.1}'")

# One H100 (estimated from FLOPs, not measured): the same designs at d=256, 8 layers, the 8k
# tokenizer, sequence 256, batch 32, 1000 steps (eight runs share the GPU).
GPU = ("size=small", "model.num_layers=8", "data.seq_length=256", "trainer.global_batch_size=32",
       "trainer.micro_batch_size=32", "trainer.train_steps=1000",
       "optim.min_lr='${times:${optim.lr},0.1}'",
       "optim.warmup_steps='${steps_fraction:${trainer.train_steps},0.1}'",
       "trainer.eval_batches=8")
GPU_GRID = _lrs(3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def _both(sweep: str | None, cpu: tuple[str, ...], gpu: tuple[str, ...]) -> Grid:
    return Grid(sweep, {"cpu": (*CPU, *cpu), "gpu": (*GPU, *gpu)})


_add(Study(
    "gpt_vs_llama2",
    "GPT and Llama2 recipes: held-out loss against peak LR (5 seeds), and where they separate",
    "LLM-jp's 172B run replaced the GPT-style recipe of its 175B run, which suffered loss "
    "spikes, with a Llama2-style recipe and trained without them: the Llama2 recipe is the more "
    "stable one (and reaches a lower loss).",
    "LLM-jp talk (seeds/); LLM-jp-3 report",
    # The bases of the ablation's variants, in the standard regime (not ablation.yaml's).
    {"main": _both(None, (SEEDS5, CPU_GRID, "+sweep/ablation=gpt,llama2"),
                   (SEEDS5, GPU_GRID, "+sweep/ablation=gpt,llama2")),
     "separating": _both("gpt_vs_llama2", (*SEPARATING, SEEDS5), (*SEPARATING, SEEDS5))},
))
_add(Study(
    "norm_placement",
    "Post-LN against pre-LN without warmup: held-out loss against peak LR (GPT recipe)",
    "Post-LN transformers need a learning-rate warmup: without it they diverge or stall at "
    "learning rates where pre-LN trains (the gradients of the layers near the output are large "
    "at initialisation).",
    "Xiong et al. 2020 (On Layer Normalization in the Transformer Architecture); Liu et al. 2020",
    # post-LN's optimum without warmup lies at the low end: the grid reaches 3e-4 to bracket it
    {"main": _both("norm_placement", (SEEDS, _lrs(3e-4, 1e-3, 3e-3, 1e-2, 3e-2)),
                   (SEEDS, _lrs(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)))},
))
_add(Study(
    "qk_norm",
    "QK-layernorm: max attention logit and held-out loss against peak LR (Llama2 recipe)",
    "Without QK-layernorm, attention logits grow with the learning rate until attention "
    "collapses and training becomes unstable; QK-layernorm removes the growth and lowers LR "
    "sensitivity.",
    "Dehghani et al. 2023 (ViT-22B); Wortsman et al. 2023 (Small-scale proxies)",
    {"main": _both("qk_norm", (SEEDS, _lrs(1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
                   (SEEDS, _lrs(3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)))},
))
_add(Study(
    "z_loss",
    "z-loss without weight decay: output logsumexp drift and held-out loss (Llama2 recipe)",
    "Without weight decay the output logits drift at high learning rates (their logsumexp moves "
    "away from 0); z-loss 1e-4 keeps logsumexp near 0 and prevents the divergence.",
    "Wortsman et al. 2023 (3.1.2); Chowdhery et al. 2022 (PaLM)",
    {"main": _both("z_loss", (SEEDS,), (SEEDS,))},
))
_add(Study(
    "spike_no_more",
    "Embeddings plain, scaled by sqrt(d), layernormed: early gradient spikes (GPT recipe)",
    "Embeddings with a small norm make gradient spikes and loss spikes likely early in "
    "training; scaling them by sqrt(d) or normalising them keeps their norm near 1 and "
    "prevents the spikes.",
    "Takase et al. 2023 (Spike No More)",
    {"main": _both("spike_no_more", (SEEDS,), (SEEDS,)),
     "layernorm": _both("spike_no_more", (SEEDS, "model.scaled_embedding=false",
                                          "model.embedding_layernorm=true"),
                        (SEEDS, "model.scaled_embedding=false",
                         "model.embedding_layernorm=true"))},
))
_add(Study(
    "adam_eps",
    "Adam epsilon 1e-8 against 1e-5 with ordinary and with tiny gradients (Llama2 recipe)",
    "Adam eps 1e-5 (LLM-jp 172B) damps the updates of parameters with small gradients: where "
    "gradients are small, as in large models, it slows learning, so LLM-jp-3 172B and OLMo 2 "
    "went back to 1e-8.",
    "LLM-jp-3 report; OLMo 2 (Team OLMo 2024); Wortsman et al. 2023 (3.4)",
    {"main": _both("adam_eps", (SEEDS,), (SEEDS,))},
))
_add(Study(
    "init_std",
    "Init std 0.005 against 0.02, embeddings plain or scaled by sqrt(d): held-out loss and "
    "early gradient spikes (GPT recipe)",
    "GPT's small init (std 0.005) with plain embeddings leaves the embeddings' norm tiny, the "
    "condition for loss spikes; the Llama2 recipe's std 0.02 with embeddings scaled by sqrt(d) "
    "is the stable choice.",
    "Takase et al. 2023 (Spike No More); OLMo 2 (3.2); LLM-jp talk (seeds/)",
    {"main": _both("init_std", (SEEDS,), (SEEDS,))},
))
_add(Study(
    "width_scaling",
    "LR sensitivity as the model widens, with and without QK-layernorm (Llama2 recipe)",
    "Without QK-layernorm the learning rate at which training becomes unstable falls, and LR "
    "sensitivity grows, as models get wider; QK-layernorm keeps the growth small.",
    "Wortsman et al. 2023 (Small-scale proxies)",
    # Llama2's optimum at d=128 is 3e-3 (qk_norm): the grid reaches 1e-3 to bracket it
    {"main": _both("width_scaling", (SEEDS, _lrs(1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
                   (SEEDS, "model.hidden_size=128,256,512", _lrs(1e-3, 3e-3, 1e-2, 3e-2, 1e-1)))},
))
_add(Study(
    "ablation",
    "Each change of the recipe table applied alone to GPT and removed alone from Llama2, where "
    "the recipes separate",
    "Each change of LLM-jp's recipe table (RMSNorm, scaled embeddings, z-loss, Adam eps 1e-5, "
    "init std 0.02, Llama architecture) was adopted for the 172B run's stability: applied to "
    "the GPT recipe it should make training more stable, removed from the Llama2 recipe less.",
    "LLM-jp talk (seeds/)",
    {"main": _both("ablation", (*SEPARATING, SEEDS), (*SEPARATING, SEEDS))},
))
_add(Study(
    "spike_recovery",
    "A blow-up and the spike policies: alert only, skip the step, roll back (GPT where the "
    "recipes separate, 1000 steps)",
    "Loss spikes are survivable: skipping the offending updates (OLMo-core's SkipStepOptimizer) "
    "or restarting from a checkpoint before the spike and skipping the batches around it (PaLM) "
    "lets training continue where it would otherwise diverge.",
    "Chowdhery et al. 2022 (PaLM, 5.1); OLMo-core",
    {"main": _both("spike_recovery", (*SEPARATING, SEEDS, "trainer.train_steps=1000",
                                      "checkpoint.interval=20", "checkpoint.keep_last=3"),
                   (*SEPARATING, SEEDS, "trainer.train_steps=2500", "checkpoint.interval=50",
                    "checkpoint.keep_last=3"))},
))
_add(Study(
    "spike_timeline",
    "An engineering check, not a published finding: a loss curve with every detector event "
    "marked, an injected LR spike and a real blow-up",
    "Our bar (DESIGN.md): every loss spike that matters is flagged within 2 steps of its onset, "
    "with no false alarm on the clean stretch before it.",
    "DESIGN.md (spike detection); OLMo-core, Megatron-LM and PaLM practice",
    {"main": Grid("spike_timeline", {
        "cpu": ("size=study", "recipe=gpt", SEEDS),
        "gpu": (*GPU, "recipe=gpt", SEEDS, "fault.at_step=250")}),
     "genuine": _both("gpt_vs_llama2", (*SEPARATING, "recipe=gpt", "trainer.seed=1"),
                      (*SEPARATING, "recipe=gpt", "trainer.seed=1"))},
))
