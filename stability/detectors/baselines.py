"""Published spike rules, kept as baselines to beat (see docs/detectors.md).

- ``megatron_spiky``: Megatron-LM's rerun state machine, ``is_unexpectedly_large``.
- ``kill_loss_spike``: LLM Foundry's ``KillLossSpike`` callback.
- ``olmo_spike``: the OLMo 2 spike score (OLMo-core ``StabilityMonitor``).

They follow the published rules; what differs is written in each docstring. Non-finite values
are skipped by all three (``nonfinite`` is the detector for them).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from stability.detectors.base import BaseDetector, Event, get_value, init_args, register


@register("megatron_spiky")
class MegatronSpikyDetector(BaseDetector):
    """Megatron's "spiky loss" check: ``|value| >= threshold x`` the max of the first values.

    Megatron-LM (``megatron/core/rerun_state_machine.py``, ``is_unexpectedly_large``) records
    the max of ``|value|`` over the first ``num_samples`` values and from then on flags any
    value at least ``threshold`` times that max (``threshold=10`` for the loss). The reference
    never changes after calibration. Here: one event per incident (re-armed when the value
    falls back under the threshold), where Megatron flags every such step.

    Args:
        metric: Key to watch.
        threshold: Multiple of the calibration max.
        num_samples: Values used for calibration.
    """

    def __init__(self, metric: str = "loss", threshold: float = 10.0, num_samples: int = 100):
        super().__init__(**init_args(locals()))
        self.metric = metric
        self.requires = (metric,)
        self.threshold = threshold
        self.num_samples = num_samples
        self._count = 0
        self._max = 0.0
        self._active = False

    def _update(self, step: int, metrics: Mapping[str, Any]) -> list[Event]:
        v = get_value(metrics, self.metric)
        if v is None or not math.isfinite(v):
            return []
        a = abs(v)
        if self._count < self.num_samples:
            self._count += 1
            self._max = max(self._max, a)
            return []
        limit = self._max * self.threshold
        if a < limit:
            self._active = False
            return []
        if self._active:
            return []
        self._active = True
        score = a / self._max if self._max > 0 else math.inf
        return [
            Event(
                step=step,
                detector=self.name,
                metric=self.metric,
                value=v,
                threshold=limit,
                score=score,
                message=f"{self.metric}={v:.4g} >= {self.threshold:g}x max of first "
                f"{self.num_samples} ({self._max:.4g})",
            )
        ]

    def _get_state(self) -> dict[str, Any]:
        return {"count": self._count, "max": self._max, "active": self._active}

    def _set_state(self, state: dict[str, Any]) -> None:
        self._count = int(state["count"])
        self._max = float(state["max"])
        self._active = bool(state["active"])


@register("kill_loss_spike")
class KillLossSpikeDetector(BaseDetector):
    """LLM Foundry's ``KillLossSpike``: loss >= 2x the window mean for more than 4 rows.

    Once the window holds ``window`` values, a value at least ``multiplier`` times the window
    mean is an outlier; more than ``patience`` consecutive outliers is a spike (so the fifth
    outlier fires with the defaults). Every finite value enters the window, outliers included,
    as in the reference. The reference also flags "high loss": after ``2 * window`` steps, at
    least half of the window above ``loss_cap``; that fires a second kind of event here.
    One event per outlier run (the reference raises, or logs every further step).

    Args:
        metric: Key to watch.
        multiplier: Outlier factor over the window mean.
        patience: Consecutive outliers tolerated.
        window: Window length (rows).
        loss_cap: "High loss" level.
    """

    def __init__(
        self,
        metric: str = "loss",
        multiplier: float = 2.0,
        patience: int = 4,
        window: int = 100,
        loss_cap: float = 10.0,
    ) -> None:
        super().__init__(**init_args(locals()))
        self.metric = metric
        self.requires = (metric,)
        self.multiplier = multiplier
        self.patience = patience
        self.window = window
        self.loss_cap = loss_cap
        self._values: deque[float] = deque(maxlen=window)
        self._sum = 0.0
        self._outliers = 0
        self._fired = False
        self._high = False

    def _update(self, step: int, metrics: Mapping[str, Any]) -> list[Event]:
        v = get_value(metrics, self.metric)
        if v is None or not math.isfinite(v):
            return []
        events = []
        if len(self._values) == self.window:
            mean = math.fsum(self._values) / self.window
            limit = mean * self.multiplier
            spike = False
            if v >= limit:
                self._outliers += 1
                spike = self._outliers > self.patience
            else:
                self._outliers = 0
                self._fired = False
            if spike and not self._fired:
                self._fired = True
                events.append(
                    Event(
                        step=step,
                        detector=self.name,
                        metric=self.metric,
                        value=v,
                        threshold=limit,
                        score=v / mean if mean > 0 else math.inf,
                        message=f"{self.metric} >= {self.multiplier:g}x the "
                        f"{self.window}-row mean for {self._outliers} rows",
                    )
                )
            if not spike:
                high = step >= 2 * self.window and (
                    sum(1 for x in self._values if x > self.loss_cap) >= self.window / 2
                )
                if high and not self._high:
                    events.append(
                        Event(
                            step=step,
                            detector=self.name,
                            metric=self.metric,
                            value=v,
                            threshold=self.loss_cap,
                            score=v / self.loss_cap,
                            message=f"half the last {self.window} {self.metric} values "
                            f"> {self.loss_cap:g}",
                        )
                    )
                self._high = high
        self._values.append(v)
        return events

    def _get_state(self) -> dict[str, Any]:
        return {
            "values": list(self._values),
            "outliers": self._outliers,
            "fired": self._fired,
            "high": self._high,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._values = deque((float(x) for x in state["values"]), maxlen=self.window)
        self._outliers = int(state["outliers"])
        self._fired = bool(state["fired"])
        self._high = bool(state["high"])


class _MeanStd:
    """Mean and standard deviation of the last ``size`` values, O(1) per update.

    Running sums, recomputed exactly every ``size`` additions so rounding cannot drift; the
    recompute schedule is part of the state, so a resumed stream matches bit for bit.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: deque[float] = deque()
        self.s1 = 0.0
        self.s2 = 0.0
        self.adds = 0

    def add(self, x: float) -> None:
        self.values.append(x)
        self.s1 += x
        self.s2 += x * x
        if len(self.values) > self.size:
            old = self.values.popleft()
            self.s1 -= old
            self.s2 -= old * old
        self.adds += 1
        if self.adds % self.size == 0:
            self.s1 = math.fsum(self.values)
            self.s2 = math.fsum(x * x for x in self.values)

    def mean_std(self) -> tuple[float, float]:
        n = len(self.values)
        mean = self.s1 / n
        var = max(self.s2 / n - mean * mean, 0.0)
        return mean, math.sqrt(var)

    def state(self) -> dict[str, Any]:
        return {"values": list(self.values), "s1": self.s1, "s2": self.s2, "adds": self.adds}

    def load(self, state: dict[str, Any]) -> None:
        self.values = deque(float(x) for x in state["values"])
        self.s1 = float(state["s1"])
        self.s2 = float(state["s2"])
        self.adds = int(state["adds"])


@register("olmo_spike")
class OlmoSpikeDetector(BaseDetector):
    """OLMo 2 spike score: a value above mean + 7 sigma of the previous 1000 values.

    OLMo 2 ("2 OLMo 2 Furious", 2024) defines the spike score of a series as the fraction of
    values at least ``n_sigma`` standard deviations above the rolling mean of the previous
    ``window`` values; OLMo-core's ``StabilityMonitorCallback`` implements it (its code
    defaults to 6 sigma over 128 values). Checking starts once the window is full
    (``min_history``). Differences from OLMo-core: spike values do not enter the window
    (``include_spikes=False``; set True for the reference behaviour), and one event is emitted
    per run of spike rows (re-armed after ``cooldown`` non-spike rows); the score counts every
    spike row.

    The running score (spike rows / rows, over the last ``score_window`` checked rows) is
    exposed by :meth:`spike_score` and carried in each event's ``message``.

    Args:
        metrics: Keys to watch, each with its own window and score.
        n_sigma: Threshold in standard deviations.
        window: Rows in the mean/std window.
        min_history: Rows needed before checking (default: a full window).
        score_window: Rows in the running spike score.
        include_spikes: Let spike values enter the window (OLMo-core's behaviour).
        cooldown: Non-spike rows that re-arm the event.
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("loss", "grad_norm"),
        n_sigma: float = 7.0,
        window: int = 1000,
        min_history: int | None = None,
        score_window: int = 1000,
        include_spikes: bool = False,
        cooldown: int = 10,
    ) -> None:
        super().__init__(**init_args(locals()))
        self.metrics = tuple(metrics)
        self.requires = self.metrics
        self.n_sigma = n_sigma
        self.window = window
        self.min_history = window if min_history is None else min_history
        self.score_window = score_window
        self.include_spikes = include_spikes
        self.cooldown = cooldown
        self._stats = {m: _MeanStd(window) for m in self.metrics}
        self._flags: dict[str, deque[int]] = {m: deque(maxlen=score_window) for m in self.metrics}
        self._quiet = {m: cooldown for m in self.metrics}

    def spike_score(self, metric: str | None = None) -> float:
        """Fraction of spike rows among the last ``score_window`` checked rows (NaN if none)."""
        flags = self._flags[metric or self.metrics[0]]
        return sum(flags) / len(flags) if flags else math.nan

    def _update(self, step: int, metrics: Mapping[str, Any]) -> list[Event]:
        events = []
        for m in self.metrics:
            v = get_value(metrics, m)
            if v is None or not math.isfinite(v):
                continue
            st = self._stats[m]
            spike = False
            if len(st.values) >= self.min_history:
                mean, std = st.mean_std()
                limit = mean + self.n_sigma * std
                spike = std > 1e-10 and v > limit
                self._flags[m].append(int(spike))
                if spike:
                    if self._quiet[m] >= self.cooldown:
                        events.append(
                            Event(
                                step=step,
                                detector=self.name,
                                metric=m,
                                value=v,
                                threshold=limit,
                                score=(v - mean) / std,
                                message=f"{m} > mean + {self.n_sigma:g} sigma of previous "
                                f"{len(st.values)}; spike score {self.spike_score(m):.4f}",
                            )
                        )
                    self._quiet[m] = 0
                else:
                    self._quiet[m] += 1
            if self.include_spikes or not spike:
                st.add(v)
        return events

    def _get_state(self) -> dict[str, Any]:
        return {
            m: {
                "stats": self._stats[m].state(),
                "flags": list(self._flags[m]),
                "quiet": self._quiet[m],
            }
            for m in self.metrics
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        for m in self.metrics:
            self._stats[m].load(state[m]["stats"])
            self._flags[m] = deque((int(x) for x in state[m]["flags"]), maxlen=self.score_window)
            self._quiet[m] = int(state[m]["quiet"])
