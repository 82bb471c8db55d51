"""The sweeper's config, registered as ``hydra/sweeper=optuna`` (Hydra imports this module when
it scans ``hydra_plugins``; it must stay cheap: no optuna import here).

No ``from __future__ import annotations`` here: Hydra's scan runs the module without putting it
in ``sys.modules``, where dataclasses would look string annotations up.
"""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    """``hydra.sweeper.*`` for ``hydra/sweeper=optuna``."""

    _target_: str = "hydra_plugins.stability_optuna.sweeper.OptunaSweeper"
    direction: str = "minimize"
    """minimize | maximize: what to do with the task's return value."""
    study_name: str = "${hydra.job.name}"
    """Name of the study in the storage; running again with the same storage and name continues
    the study."""
    storage: str | None = "sqlite:///${hydra.sweep.dir}/optuna.db"
    """Optuna storage URL; null = in memory (nothing kept). The default keeps the study beside its
    runs; pass the same ``hydra.sweep.dir`` to continue it."""
    n_trials: int = 20
    """Trials this invocation adds to the study (a second run of the same command adds as many
    again)."""
    max_trials: int | None = None
    """Stop adding trials once the study holds this many (of any state); null = no cap."""
    n_jobs: int = 2
    """Trials asked for and launched together (one launcher batch): the parallelism."""
    sampler: str = "tpe"
    """tpe | random."""
    seed: int | None = None
    """Sampler seed; on a continued study it is offset by the trials already there, so a resumed
    search does not re-propose the first invocation's points."""
    n_startup_trials: int = 10
    """TPE: random trials before the model is used (counts the study's earlier trials)."""
    diverged_value: float | None = None
    """Objective reported for a trial whose return value is NaN or infinite (a diverged run):
    null = mark the trial FAIL (samplers ignore it); a number = complete it with that value
    (a penalty the sampler learns from, e.g. above the loss at initialisation). A trial whose
    job raised is always FAIL."""
    params: dict[str, Any] | None = None
    """Search space and fixed overrides, in Hydra's override grammar: ``interval(a,b)``,
    ``tag(log,interval(a,b))``, ``tag(int,interval(a,b))``, ``choice(a,b)`` or ``a,b``,
    ``range(start,stop[,step])``; a plain value is passed to every trial."""


ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="stability"
)
