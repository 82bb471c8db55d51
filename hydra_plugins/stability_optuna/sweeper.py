"""``hydra/sweeper=optuna``: a Hydra sweeper on optuna's ask/tell API, with persistent storage.

Each batch asks the study for ``n_jobs`` trials, turns their parameters into overrides, runs them
with the configured launcher (basic, ``hydra/launcher=local``, ``hydra/launcher=slurm``) and tells
the study the task's return value. Trial number ``k`` runs in ``<sweep dir>/<k>`` (the launcher's
job index is the trial number), so the directories of a continued study never collide.

optuna is imported only when a sweep starts: Hydra imports every plugin module at start-up.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

log = logging.getLogger(__name__)

DIRECTIONS = ("minimize", "maximize")
SAMPLERS = ("tpe", "random")
TAGS = ("log", "int")


def distribution(override: Override) -> BaseDistribution:
    """The optuna distribution of one sweep override.

    ``interval(a,b)`` -> float in [a, b]; ``tag(log, interval(a,b))`` -> log-uniform;
    ``tag(int, interval(a,b))`` -> integer; ``range(start,stop,step)`` (Hydra's: stop excluded)
    -> integers with that step, or the listed values for a float range; ``a,b,c`` or
    ``choice(a,b,c)`` -> categorical.
    """
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    key = override.get_key_element()
    value: Any = override.value()
    tags = set(getattr(value, "tags", None) or ())
    if tags - set(TAGS):
        raise HydraException(f"{key}: unknown tag {sorted(tags - set(TAGS))}; known: {TAGS}")
    log_scale = "log" in tags
    if override.is_interval_sweep():
        if "int" in tags:
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise HydraException(f"{key}: empty range")
        if all(isinstance(v, int) for v in values):
            step = abs(int(value.step)) if len(values) > 1 else 1
            if log_scale and step != 1:
                raise HydraException(f"{key}: tag(log, range(...)) needs step 1")
            return IntDistribution(min(values), max(values), step=step, log=log_scale)
        values = sorted(set(values))
    else:  # choice(a,b) or a,b (or a glob over config group options)
        values = [Override._convert_value(v) for v in override.sweep_iterator()]
    if log_scale:
        raise HydraException(f"{key}: tag(log, ...) needs interval() or an integer range()")
    choices = [v if v is None or isinstance(v, bool | int | float | str)
               else Override._get_value_element_as_str(v) for v in values]
    return CategoricalDistribution(choices)


def search_space(overrides: Sequence[Override]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Sweep overrides -> distributions by key; plain ones -> overrides passed to every trial.
    A key given twice takes its last value (the command line comes after hydra.sweeper.params).
    """
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in overrides:
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = f"{key}={override.get_value_element_as_str()}"
    return space, list(fixed.values())


def as_override(key: str, value: Any) -> str:
    return f"{key}={Override._get_value_element_as_str(value)}"


def _sqlite_parent(storage: str) -> Path | None:
    """Folder of a ``sqlite:///PATH`` storage (SQLite creates the file, not its folder)."""
    prefix = "sqlite:///"
    if not storage.startswith(prefix):
        return None
    path = storage[len(prefix):].split("?")[0]
    return None if path in ("", ":memory:") else Path(path).parent


def _consecutive_runs(numbers: list[int]) -> list[list[int]]:
    """Indices of ``numbers`` grouped into runs of consecutive values (one launch each)."""
    runs: list[list[int]] = []
    for i, n in enumerate(numbers):
        if runs and numbers[runs[-1][-1]] == n - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


class OptunaSweeper(Sweeper):
    """Ask/tell Optuna sweeper; its options are :class:`config.OptunaSweeperConf`."""

    def __init__(self, direction: str, study_name: str, storage: str | None, n_trials: int,
                 max_trials: int | None, n_jobs: int, sampler: str, seed: int | None,
                 n_startup_trials: int, diverged_value: float | None,
                 params: dict[str, Any] | None = None) -> None:
        super().__init__()
        if direction not in DIRECTIONS:
            raise HydraException(f"hydra.sweeper.direction={direction}: one of {DIRECTIONS}")
        if sampler not in SAMPLERS:
            raise HydraException(f"hydra.sweeper.sampler={sampler}: one of {SAMPLERS}")
        if n_trials < 0 or n_jobs < 1 or (max_trials is not None and max_trials < 0):
            raise HydraException("hydra.sweeper: n_trials >= 0, n_jobs >= 1, max_trials >= 0")
        self.direction = direction
        self.study_name = study_name
        self.storage = storage
        self.n_trials = n_trials
        self.max_trials = max_trials
        self.n_jobs = n_jobs
        self.sampler = sampler
        self.seed = seed
        self.n_startup_trials = n_startup_trials
        self.diverged_value = diverged_value
        self.params = dict(params or {})
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # ------------------------------------------------------------------ the search
    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        import optuna

        assert self.config is not None and self.launcher is not None
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        params = [f"{key}={value}" for key, value in self.params.items()]
        space, fixed = search_space(parser.parse_overrides([*params, *arguments]))
        if not space:
            raise HydraException(
                "hydra/sweeper=optuna: no search space; give e.g. "
                "'optim.lr=tag(log,interval(1e-4,1e-1))' in hydra.sweeper.params or as an override")

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study = self._study(optuna)
        existing = len(study.trials)
        todo = self.n_trials
        if self.max_trials is not None:
            todo = min(todo, max(0, self.max_trials - existing))
        log.info("Optuna study '%s' (%s): %d trials stored, running %d more, %d at a time",
                 self.study_name, self.storage or "in memory", existing, todo, self.n_jobs)

        returns: list[Sequence[JobReturn]] = []
        while todo > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, todo))]
            todo -= len(trials)
            batch = [[*fixed, *(as_override(k, t.params[k]) for k in space)] for t in trials]
            for trial, overrides in zip(trials, batch, strict=True):
                trial.set_user_attr("overrides", overrides)
            try:
                self.validate_batch_is_legal(batch)
                results = self._launch(batch, [t.number for t in trials])
            except BaseException as err:  # the launcher lost the batch; the study stays usable
                for trial in trials:
                    trial.set_user_attr("failure", f"launch: {type(err).__name__}: {err}"[:500])
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            for trial, result in zip(trials, results, strict=True):
                self._tell(study, trial, result)
            returns.append(results)
        self._report(study, sweep_dir)
        return returns

    def _study(self, optuna: Any) -> optuna.Study:
        """Create or load the study; close trials a killed invocation left running."""
        storage = None
        if self.storage:
            parent = _sqlite_parent(self.storage)
            if parent is not None:
                parent.mkdir(parents=True, exist_ok=True)
            storage = optuna.storages.get_storage(self.storage)
        study = optuna.create_study(study_name=self.study_name, storage=storage,
                                    direction=self.direction, load_if_exists=True)
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for frozen in running:
            log.warning("Trial %d was left running by an interrupted search: marked FAIL",
                        frozen.number)
            study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
        seed = None if self.seed is None else self.seed + len(study.trials)
        if self.sampler == "random":
            study.sampler = optuna.samplers.RandomSampler(seed=seed)
        else:
            study.sampler = optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=self.n_startup_trials)
        return study

    def _launch(self, batch: list[list[str]], numbers: list[int]) -> list[JobReturn]:
        """Run the batch; job index = trial number (several launches if numbers have gaps,
        which happens only when another process adds trials to the same study)."""
        assert self.launcher is not None
        results: list[JobReturn] = []
        for run in _consecutive_runs(numbers):
            results.extend(self.launcher.launch([batch[i] for i in run],
                                                initial_job_idx=numbers[run[0]]))
        return results

    def _tell(self, study: optuna.Study, trial: optuna.Trial, result: JobReturn) -> None:
        hydra_cfg = getattr(result, "hydra_cfg", None)
        if hydra_cfg is not None:
            trial.set_user_attr("run_dir", str(hydra_cfg.hydra.runtime.output_dir))
        try:
            value = result.return_value  # re-raises the job's exception
        except Exception as err:  # noqa: BLE001 (any error of the task fails the trial)
            self._fail(study, trial, f"{type(err).__name__}: {err}")
            return
        try:
            value = float(value)
        except (TypeError, ValueError):
            self._fail(study, trial, f"the task returned {value!r}, not a number")
            return
        if math.isfinite(value):
            study.tell(trial, value)
            return
        trial.set_user_attr("diverged", True)
        if self.diverged_value is None:
            self._fail(study, trial, f"diverged: objective {value}")
        else:
            log.info("Trial %d diverged (%s): told %s", trial.number, value,
                     self.diverged_value)
            study.tell(trial, float(self.diverged_value))

    @staticmethod
    def _fail(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
        from optuna.trial import TrialState

        log.warning("Trial %d failed: %s", trial.number, reason)
        trial.set_user_attr("failure", reason[:500])
        study.tell(trial, state=TrialState.FAIL)

    def _report(self, study: optuna.Study, sweep_dir: Path) -> None:
        """Log the best trial and write ``optuna_results.yaml`` in the sweep directory."""
        from optuna.trial import TrialState

        counts = {s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.FAIL)}
        for trial in study.get_trials(deepcopy=False):
            counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
        results: dict[str, Any] = {"study_name": self.study_name, "storage": self.storage,
                                   "direction": self.direction, "trials": len(study.trials),
                                   "states": counts}
        try:
            best = study.best_trial
        except ValueError:  # no completed trial
            log.warning("Optuna study '%s': no completed trial yet", self.study_name)
        else:
            results["best"] = {"number": best.number, "value": best.value,
                               "params": best.params,
                               "run_dir": best.user_attrs.get("run_dir")}
            log.info("Best trial %d: value %s, params %s", best.number, best.value,
                     best.params)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optuna_results.yaml")
