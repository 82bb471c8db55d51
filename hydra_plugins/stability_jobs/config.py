"""The sweeper's config, registered as ``hydra/sweeper=jobs`` (imported by Hydra's plugin scan:
keep it cheap). No ``from __future__ import annotations``: Hydra's scan runs the module without
putting it in ``sys.modules``, where dataclasses would look string annotations up."""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class JobsSweeperConf:
    """``hydra.sweeper.*`` for ``hydra/sweeper=jobs``."""

    _target_: str = "hydra_plugins.stability_jobs.sweeper.JobsSweeper"
    jobs_file: str | None = None
    """JSON file: a list of ``{"subdir": str, "overrides": [str, ...]}``, one per job, run in
    that order; each job runs in ``<hydra.sweep.dir>/<subdir>``. Overrides given on the command
    line apply to every job (before the job's own)."""
    max_batch_size: int | None = None
    """Jobs handed to the launcher at once; null = all (one launch: a local pool keeps its
    workers, and their imports, from one job to the next)."""
    params: dict[str, Any] | None = None
    """Ignored: the grid of a sweep file composed into the jobs (``+sweep=NAME``) is kept so
    that such files compose; the jobs file alone says what runs."""


ConfigStore.instance().store(
    group="hydra/sweeper", name="jobs", node=JobsSweeperConf, provider="stability"
)
