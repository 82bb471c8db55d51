"""Non-finite values: NaN or Inf in the loss or the gradient norm, caught at the first bad row."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from stability.detectors.base import BaseDetector, Event, get_value, init_args, register


@register("nonfinite")
class NonFiniteDetector(BaseDetector):
    """Fire an ``error`` event on the first row where a watched metric is NaN or +-Inf.

    This is Megatron's rerun-state-machine NaN/Inf check and torchtitan's non-finite assert,
    on the host. No warm-up, no history: it fires on the very first bad row. One event per
    metric per incident: a metric that stays non-finite fires once, and re-arms after one
    finite row of that metric.

    Args:
        metrics: Keys to check. Missing keys (and JSON nulls) are skipped.
        all_metrics: Also check every other numeric key of the row (per-layer grad norms,
            monitor statistics), each with its own incident state.
    """

    def __init__(
        self, metrics: Sequence[str] = ("loss", "grad_norm"), all_metrics: bool = False
    ) -> None:
        super().__init__(**init_args(locals()))
        self.metrics = tuple(metrics)
        self.requires = self.metrics
        self.all_metrics = all_metrics
        self._bad: set[str] = set()

    def _update(self, step: int, metrics: Mapping[str, Any]) -> list[Event]:
        keys: Sequence[str] = self.metrics
        if self.all_metrics:
            keys = [*self.metrics, *(k for k in metrics if k not in self.metrics and k != "step")]
        events = []
        for key in keys:
            v = get_value(metrics, key)
            if v is None:
                continue
            if math.isfinite(v):
                self._bad.discard(key)
            elif key not in self._bad:
                self._bad.add(key)
                events.append(
                    Event(
                        step=step,
                        detector=self.name,
                        metric=key,
                        value=v,
                        threshold=math.nan,
                        score=math.inf,
                        severity="error",
                        kind="nonfinite",
                        message=f"{key} is {v} at step {step}",
                    )
                )
        return events

    def _get_state(self) -> dict[str, Any]:
        return {"bad": sorted(self._bad)}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._bad = set(state["bad"])
