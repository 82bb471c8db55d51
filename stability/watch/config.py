"""The ``monitors``, ``detectors``, ``actions`` and ``fault`` sections of the run configuration
(no torch: the CLI reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stability.errors import ConfigError, in_range, one_of, positive

ACTIONS = ("log", "alert", "skip_step", "rollback", "stop")
FAULT_KINDS = ("lr_spike", "bad_batch", "nan")


@dataclass
class MonitorConfig:
    """Statistics worth watching, recorded as device tensors (no host sync on the hot path)."""

    enabled: bool = True
    """Record the monitors below (loss, grad norm and logit statistics are always recorded)."""
    interval: int = 10
    """Steps between per-layer grad norms and Adam second-moment health (full passes over
    gradients and optimizer state)."""
    attention_interval: int = 1
    """Steps between max attention logits (an extra q.k^T per layer on the first sequence)."""
    attention_rows: int = 512
    """Query positions (evenly spaced, the last one included) whose logits against every key
    the attention probe reads; all of them when the sequence is no longer. At sequence 4096,
    512 rows cost an eighth of the full q.k^T."""
    update_interval: int = 1
    """Steps between update/parameter ratios and embedding output std (cheap: see below)."""
    update_rows_fraction: float = 0.0625
    """Share of each weight's rows (fixed, random) on which update ratios are measured; 1 =
    exact. Adam's per-element updates are of similar size, so a sample estimates the ratio
    well at a fraction of a full pass over the parameters."""

    def validate(self) -> None:
        positive("monitors.interval", self.interval)
        positive("monitors.attention_interval", self.attention_interval, zero_ok=True)
        positive("monitors.attention_rows", self.attention_rows)
        positive("monitors.update_interval", self.update_interval, zero_ok=True)
        in_range("monitors.update_rows_fraction", self.update_rows_fraction, 0.0, 1.0,
                 low_open=True, high_open=False)


def _default_detectors() -> list[str]:
    from stability.detectors import DEFAULT_DETECTORS  # torch-free, like this module

    return list(DEFAULT_DETECTORS)


@dataclass
class DetectorsConfig:
    """Spike detectors run on every metrics row (the ``detectors=`` config group)."""

    names: list[str] = field(default_factory=_default_detectors)
    """Registry names (stability/detectors); [] = none. The default is
    ``stability.detectors.DEFAULT_DETECTORS``."""
    params: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments per detector name, e.g. {loss_spike: {window: 64}}."""

    def validate(self) -> None:
        from stability.detectors import build_detectors

        build_detectors(self.names, self.params)  # ConfigError on a bad name or parameter


@dataclass
class ActionsConfig:
    """What the run does about detector events."""

    on_spike: str = "alert"
    """log | alert | skip_step | rollback | stop, for loss and grad-norm spikes."""
    on_nonfinite: str = "stop"
    """log | alert | skip_step | rollback | stop, for NaN/Inf loss or gradients."""
    on_leading: str = "alert"
    """log | alert, for leading signs (attention-logit growth, logsumexp drift, ...)."""
    rollback_skip_batches: int = 50
    """Global batches skipped after a rollback (PaLM skipped 200-500)."""
    rollback_margin_steps: int = 5
    """Roll back to a checkpoint at least this many steps before the event."""
    max_rollbacks: int = 3
    """After this many rollbacks a further one stops the run instead."""
    skip_zscore: float = 6.0
    """skip_step: skip when loss or grad norm exceeds mean + z * std of the recent window
    (OLMo-core's SkipStepOptimizer rule, decided on the device)."""
    skip_window: int = 128
    """skip_step: steps of history behind the z-score (at least 10 are needed to skip)."""

    @property
    def rolls_back(self) -> bool:
        """Does some policy roll back (so checkpoints must be written during the run)?"""
        return "rollback" in (self.on_spike, self.on_nonfinite)

    def validate(self) -> None:
        one_of("actions.on_spike", self.on_spike, ACTIONS)
        one_of("actions.on_nonfinite", self.on_nonfinite, ACTIONS)
        one_of("actions.on_leading", self.on_leading, ("log", "alert"))
        positive("actions.rollback_skip_batches", self.rollback_skip_batches, zero_ok=True)
        positive("actions.rollback_margin_steps", self.rollback_margin_steps, zero_ok=True)
        positive("actions.max_rollbacks", self.max_rollbacks, zero_ok=True)
        positive("actions.skip_zscore", self.skip_zscore)
        if self.skip_window < 10:
            raise ConfigError("actions.skip_window", self.skip_window, ">= 10")


@dataclass
class FaultConfig:
    """Fault injection for tests and demos."""

    at_step: int | None = None
    """First step of the fault; None = off."""
    kind: str = "lr_spike"
    """lr_spike (LR x magnitude) | bad_batch (random tokens) | nan (NaN loss)."""
    magnitude: float = 100.0
    """LR multiplier for lr_spike."""
    duration: int = 1
    """Steps the fault lasts."""

    def validate(self) -> None:
        one_of("fault.kind", self.kind, FAULT_KINDS)
        if self.at_step is not None:
            positive("fault.at_step", self.at_step)
            positive("fault.duration", self.duration)
            positive("fault.magnitude", self.magnitude)
