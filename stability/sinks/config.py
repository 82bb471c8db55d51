"""The ``logger`` section of the run configuration (no torch: the CLI reads it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from stability.errors import ConfigError, one_of, positive

WANDB_MODES = ("offline", "online", "disabled")
WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
"""Older spellings W&B still accepts in ``WANDB_MODE``."""

WANDB_ENV = {"mode": "WANDB_MODE", "project": "WANDB_PROJECT", "entity": "WANDB_ENTITY",
             "name": "WANDB_NAME", "group": "WANDB_RUN_GROUP", "job_type": "WANDB_JOB_TYPE"}
"""W&B's standard environment variables, read for the keys the config leaves at None."""

WANDB_DEFAULTS = {"mode": "disabled", "project": "stability", "job_type": "train"}
"""What a key is when neither the config nor the environment sets it."""


@dataclass
class WandbConfig:
    """Weights & Biases sink."""

    mode: str | None = None
    """offline | online | disabled; None = $WANDB_MODE, else disabled."""
    project: str | None = None
    """W&B project; None = $WANDB_PROJECT, else stability."""
    entity: str | None = None
    """W&B entity (team or user); None = $WANDB_ENTITY, else the default of the API key."""
    name: str | None = None
    """Run name; None = $WANDB_NAME, else the run's recipe, size and overrides
    (``gpt-tiny/optim.lr=0.001,trainer.seed=1``)."""
    group: str | None = None
    """Run group; None = $WANDB_RUN_GROUP, else the study (``+sweep=NAME``), else a multirun's
    sweep directory name, else none."""
    job_type: str | None = None
    """Run job type; None = $WANDB_JOB_TYPE, else train."""
    tags: list[str] = field(default_factory=list)
    """Run tags, besides the recipe and size names (always added)."""
    alert_min_interval_steps: int = 50
    """At most one alert per (detector, metric) in this many steps (errors are exempt)."""
    max_alerts: int = 20
    """At most this many alerts per run; later events only go to the events table."""
    table_interval_steps: int = 100
    """Log the events table's new rows at most every this many steps while events arrive."""

    def validate(self) -> None:
        if self.mode is not None:
            one_of("logger.wandb.mode", self.mode, WANDB_MODES)
        self.resolved_mode()  # a bad $WANDB_MODE is refused before any work too
        positive("logger.wandb.alert_min_interval_steps", self.alert_min_interval_steps,
                 zero_ok=True)
        positive("logger.wandb.max_alerts", self.max_alerts, zero_ok=True)
        positive("logger.wandb.table_interval_steps", self.table_interval_steps)

    def resolved(self, key: str, env: Mapping[str, str] | None = None, *,
                 default: bool = True) -> str | None:
        """``key`` (one of :data:`WANDB_ENV`'s) as the run uses it: the config's value, else
        W&B's environment variable, else (with ``default``) :data:`WANDB_DEFAULTS`; None where
        W&B or the launch decides."""
        value = getattr(self, key)
        if value is None:
            value = (os.environ if env is None else env).get(WANDB_ENV[key]) or None
        if value is None and default:
            return WANDB_DEFAULTS.get(key)
        return value

    def resolved_mode(self, env: Mapping[str, str] | None = None) -> str:
        """offline | online | disabled: ``logger.wandb.mode``, else ``$WANDB_MODE``, else
        disabled.

        Raises:
            ConfigError: ``$WANDB_MODE`` is none of them (nor dryrun or run, their old names).
        """
        mode = self.resolved("mode", env)
        mode = WANDB_MODE_ALIASES.get(mode, mode)
        if mode not in WANDB_MODES:
            raise ConfigError("WANDB_MODE", mode, "one of " + ", ".join(WANDB_MODES))
        return mode


@dataclass(frozen=True)
class RunLabels:
    """How the launch names a run in W&B (``stability.train.labels_from_hydra``); the config's
    ``logger.wandb.name`` and ``group`` (and W&B's environment variables) win over these."""

    name: str | None = None
    """Readable run name: recipe, size and the overrides."""
    group: str | None = None
    """The study or sweep the run belongs to."""


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl."""

    console: bool = True
    """Print a progress line."""
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        self.wandb.validate()
