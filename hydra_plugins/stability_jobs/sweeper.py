"""``hydra/sweeper=jobs``: launch the jobs listed in a JSON file (see ``config.py``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def read_jobs(path: str | Path) -> list[tuple[str, list[str]]]:
    """The ``(subdir, overrides)`` of each job of a jobs file; raises on a malformed file."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HydraException(f"hydra.sweeper.jobs_file={path}: {err}") from err
    jobs = []
    for i, entry in enumerate(entries if isinstance(entries, list) else [None]):
        ok = isinstance(entry, dict) and isinstance(entry.get("subdir"), str) and isinstance(
            entry.get("overrides"), list) and all(isinstance(o, str) for o in entry["overrides"])
        if not ok or not entry["subdir"] or "," in entry["subdir"]:
            raise HydraException(f"{path}: job {i} must be {{'subdir': str (no commas), "
                                 f"'overrides': [str, ...]}}, got {entry!r}")
        jobs.append((entry["subdir"], list(entry["overrides"])))
    return jobs


class JobsSweeper(Sweeper):
    """Runs an explicit list of jobs; its options are :class:`config.JobsSweeperConf`."""

    def __init__(self, jobs_file: str | None = None, max_batch_size: int | None = None,
                 params: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not jobs_file:
            raise HydraException("hydra/sweeper=jobs needs hydra.sweeper.jobs_file=PATH")
        if max_batch_size is not None and max_batch_size < 1:
            raise HydraException(f"hydra.sweeper.max_batch_size={max_batch_size}: >= 1 or null")
        self.jobs_file = jobs_file
        self.max_batch_size = max_batch_size
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None
        jobs = read_jobs(self.jobs_file)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        batch = [[*arguments, *overrides, f"hydra.sweep.subdir={subdir}"]
                 for subdir, overrides in jobs]
        size = self.max_batch_size or max(len(batch), 1)
        log.info("Running %d jobs from %s, %d per launch", len(batch), self.jobs_file, size)
        returns: list[Sequence[JobReturn]] = []
        failed: list[str] = []
        for start in range(0, len(batch), size):
            # No validate_batch_is_legal: it composes every job here once more (~0.2 s each);
            # a job that does not compose fails alone, and the others go on.
            chunk = batch[start:start + size]
            results = self.launcher.launch(chunk, initial_job_idx=start)
            for (subdir, _), result in zip(jobs[start:start + size], results, strict=True):
                if result.status == JobStatus.FAILED:  # keep going: the others are still useful
                    failed.append(f"{subdir}: {_error(result)}")
            returns.append(results)
        if failed:
            log.error("%d of %d jobs failed:\n  %s", len(failed), len(batch), "\n  ".join(failed))
        return returns


def _error(result: Any) -> str:
    value = getattr(result, "_return_value", None)
    return f"{type(value).__name__}: {value}"[:300]
