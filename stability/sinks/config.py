"""The ``logger`` section of the run configuration (no torch: the CLI reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stability.errors import one_of, positive

WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class WandbConfig:
    """Weights & Biases sink."""

    mode: str = "disabled"
    """offline | online | disabled."""
    project: str = "stability"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); None = the default of the API key."""
    name: str | None = None
    """Run name; None = the run directory's name."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""
    alert_min_interval_steps: int = 50
    """At most one alert per (detector, metric) in this many steps (errors are exempt)."""
    max_alerts: int = 20
    """At most this many alerts per run; later events only go to the events table."""
    table_interval_steps: int = 100
    """Re-log the events table at most every this many steps while new events arrive."""

    def validate(self) -> None:
        one_of("logger.wandb.mode", self.mode, WANDB_MODES)
        positive("logger.wandb.alert_min_interval_steps", self.alert_min_interval_steps,
                 zero_ok=True)
        positive("logger.wandb.max_alerts", self.max_alerts, zero_ok=True)
        positive("logger.wandb.table_interval_steps", self.table_interval_steps)


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl."""

    console: bool = True
    """Print a progress line."""
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        self.wandb.validate()
