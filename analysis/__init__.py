"""Analysis of finished runs: run directories -> tidy tables -> stability metrics -> figures.

This package reads only run outputs (``config.yaml``, ``metrics.jsonl``, ``events.jsonl``,
``summary.json``, ``.hydra/overrides.yaml``). It never imports the training code or torch.

Modules: :mod:`analysis.runs` (loading), :mod:`analysis.metrics` (stability metrics),
:mod:`analysis.stats` (spread over seeds), :mod:`analysis.style` (paper figures; not imported
here, so that loading runs needs no matplotlib), :mod:`analysis.table` (the table command).
"""

from analysis.metrics import (
    FINAL_K,
    MERGE_GAP,
    best_loss,
    count_incidents,
    final_loss,
    grid_metrics,
    grid_per_seed,
    is_diverged,
    loss_at_init,
    loss_spike_steps,
    lr_sensitivity,
    max_stable_lr,
    merge_incidents,
    run_metrics,
    spike_rate,
    spike_score,
    steps_to_recover,
)
from analysis.runs import RunData, find_runs, load_run, load_runs, load_wandb_project, read_jsonl
from analysis.stats import SeedStat, over_seeds, seed_ci

__all__ = [
    "FINAL_K",
    "MERGE_GAP",
    "RunData",
    "SeedStat",
    "best_loss",
    "count_incidents",
    "final_loss",
    "find_runs",
    "grid_metrics",
    "grid_per_seed",
    "is_diverged",
    "load_run",
    "load_runs",
    "load_wandb_project",
    "loss_at_init",
    "loss_spike_steps",
    "lr_sensitivity",
    "max_stable_lr",
    "merge_incidents",
    "over_seeds",
    "read_jsonl",
    "run_metrics",
    "seed_ci",
    "spike_rate",
    "spike_score",
    "steps_to_recover",
]
