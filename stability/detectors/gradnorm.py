"""Gradient-norm spikes: a ZClip-style EMA z-score on the log gradient norm."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from stability.detectors.base import BaseDetector, Event, get_value, init_args, register


@register("grad_norm_spike")
class GradNormSpikeDetector(BaseDetector):
    """Robust z-score of ``log(grad_norm)`` against an exponential moving mean and variance.

    ZClip (Kumar et al. 2025) keeps EMAs (``alpha=0.97``) of the gradient norm's mean and
    variance after a 25-step warm-up and treats ``z > 2.5`` as a spike to clip, updating the
    EMAs with the clipped value. Here the same statistics run on ``log(grad_norm)`` (gradient
    norms are heavy-tailed and span decades early in training), an event needs both
    ``z >= k`` and a ratio to the EMA level of at least ``min_ratio``, and:

    - rows with ``clip_z <= z < k`` update the EMAs clipped to ``mean + clip_z * sigma``
      (ZClip's rule); rows with ``z >= k`` are not used at all, unless an incident has lasted
      ``max_hold`` rows, after which they enter clipped (the level has really moved);
    - one event per incident: re-armed after ``release`` consecutive rows with ``z < k / 2``.

    Args:
        metric: Key to watch (positive values; zero and non-finite rows are skipped).
        alpha: EMA decay per row.
        warmup: Rows averaged before the first check.
        k: Event threshold (sigmas of log grad norm).
        min_ratio: Event needs ``grad_norm >= min_ratio * exp(EMA mean)``.
        clip_z: Winsorising level for the EMA update.
        min_sigma: Floor of sigma (log units).
        release: Quiet rows that re-arm the event.
        max_hold: Incident rows after which spike rows update the EMAs (clipped).
    """

    requires = ("grad_norm",)

    def __init__(
        self,
        metric: str = "grad_norm",
        alpha: float = 0.97,
        warmup: int = 25,
        k: float = 6.0,
        min_ratio: float = 5.0,
        clip_z: float = 2.5,
        min_sigma: float = 0.05,
        release: int = 3,
        max_hold: int = 50,
    ) -> None:
        super().__init__(**init_args(locals()))
        self.metric = metric
        self.requires = (metric,)
        self.alpha = alpha
        self.warmup = warmup
        self.k = k
        self.log_ratio = math.log(min_ratio)
        self.clip_z = clip_z
        self.min_sigma = min_sigma
        self.release = release
        self.max_hold = max_hold
        self._warm: list[float] = []
        self._mean = 0.0
        self._var = 0.0
        self._active = False
        self._quiet = 0
        self._held = 0

    def _update(self, step: int, metrics: Mapping[str, Any]) -> list[Event]:
        v = get_value(metrics, self.metric)
        if v is None or not math.isfinite(v) or v <= 0.0:
            return []
        y = math.log(v)
        if len(self._warm) < self.warmup:
            self._warm.append(y)
            if len(self._warm) == self.warmup:
                n = self.warmup
                self._mean = sum(self._warm) / n
                self._var = sum((w - self._mean) ** 2 for w in self._warm) / n
            return []
        sigma = max(math.sqrt(self._var), self.min_sigma)
        d = y - self._mean
        z = d / sigma
        spike = z >= self.k and d >= self.log_ratio
        events = []
        if self._active:
            self._held += 1
            if z < self.k / 2:
                self._quiet += 1
                if self._quiet >= self.release:
                    self._active = False
            else:
                self._quiet = 0
        elif spike:
            self._active = True
            self._quiet = 0
            self._held = 0
            level = math.exp(self._mean)
            limit = level * math.exp(max(self.k * sigma, self.log_ratio))
            events.append(
                Event(
                    step=step,
                    detector=self.name,
                    metric=self.metric,
                    value=v,
                    threshold=limit,
                    score=z,
                    message=f"{self.metric}={v:.4g} is {v / level:.1f}x its EMA {level:.4g} "
                    f"(z={z:.1f})",
                )
            )
        if z < self.k or (self._active and self._held >= self.max_hold):
            yc = min(y, self._mean + self.clip_z * sigma)
            self._mean = self.alpha * self._mean + (1 - self.alpha) * yc
            self._var = self.alpha * self._var + (1 - self.alpha) * (yc - self._mean) ** 2
        return events

    def _get_state(self) -> dict[str, Any]:
        return {
            "warm": list(self._warm),
            "mean": self._mean,
            "var": self._var,
            "active": self._active,
            "quiet": self._quiet,
            "held": self._held,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._warm = [float(x) for x in state["warm"]]
        self._mean = float(state["mean"])
        self._var = float(state["var"])
        self._active = bool(state["active"])
        self._quiet = int(state["quiet"])
        self._held = int(state["held"])
