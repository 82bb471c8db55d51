"""Early blow-ups: the loss gives back what it has learned since init, from the first rows."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from stability.detectors.base import (
    BaseDetector,
    Event,
    RollingQuantiles,
    get_value,
    init_args,
    median,
    register,
)

MAD2_TO_SIGMA = 1.0 / (0.6745 * math.sqrt(6.0))
"""Median |second difference| -> sigma of white noise (a second difference has variance 6
sigma^2; a straight or gently curved trend cancels out of it)."""
MAD1_TO_SIGMA = 1.0 / (0.6745 * math.sqrt(2.0))
"""Median |first difference| -> sigma of white noise (a steep fall inflates it: conservative)."""


MIN_NOISE_ROWS = 12
"""The "above init" rule waits for this many second differences (a noise estimate)."""
ABOVE_FACTOR = 1.5
"""The "above init" rule needs ``ABOVE_FACTOR * k`` sigmas: the loss at init is itself a median
of 3 noisy rows."""


@register("loss_rebound")
class LossRebound(BaseDetector):
    """The loss climbs back towards (or past) its value at init: needs no history.

    A run that blows up early (no warm-up, an LR too high) first learns, then its loss climbs
    back to where it started, often within a few dozen steps, before a trend detector has the
    rows it needs. This rule anchors on the two levels every run has from its first rows: the
    loss at init ``L0`` (the median of the first 3 rows: about ``ln(vocab)``) and the lowest
    loss so far ``m`` (the running minimum of 3-row medians), in log units. What the run has
    learned is ``P = log L0 - log m``. On the lowest of the last 3 rows ``y`` (a climb lasts,
    an excursion does not):

    - rebound: ``y - log m >= max(share * P, k * sigma)`` once ``P >= min_progress * sigma``
      (the loss has given back ``share`` of what it learned, by more than the noise);
    - above init: ``y - log L0 >= 1.5 * k * sigma`` (worse than the model at init, which
      knows nothing: a loss above it is never training) once the noise has been measured on
      ``MIN_NOISE_ROWS`` rows; before that, ``y - log L0 >= log(1 + init_margin)`` (the loss
      at init barely varies from batch to batch, so a run whose 3 rows all sit 10% above it
      is unstable from the start; it no longer waits ~15 rows for a noise estimate).

    ``sigma`` is the noise of the log loss: the larger of the estimates from the median
    absolute first and second differences of the last ``window`` rows (a falling trend
    cancels out of second differences; correlated noise hides from them, less from first
    differences), at least ``min_sigma``. All three rows must agree, so hard batches never
    fire. One event per incident: re-armed once ``y`` has been back under
    ``log m + share * P / 2`` for ``release`` rows. It keeps watching the whole run (late in a
    run ``P`` is large and the rule is a last line of defence); the trend detector
    ``loss_spike`` takes over the fine work once it has its history.

    Args:
        metric: Key to watch (positive values).
        share: Share of the progress ``P`` given back that fires.
        k: Both rules also need this many noise sigmas.
        min_progress: The rebound rule waits until ``P`` is this many sigmas.
        window: Rows for the noise estimate.
        min_sigma: Floor of the noise (log units).
        release: Quiet rows that re-arm the detector.
        init_margin: The "above init" rule's margin (a share of the loss at init) until the
            noise has been measured.
    """

    requires = ("loss",)

    def __init__(
        self,
        metric: str = "loss",
        share: float = 0.4,
        k: float = 4.0,
        min_progress: float = 8.0,
        window: int = 16,
        min_sigma: float = 0.01,
        release: int = 3,
        init_margin: float = 0.1,
        above_rows: int = 2,
    ) -> None:
        super().__init__(**init_args(locals()))
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share={share!r} is not allowed: in (0, 1]")
        self.metric = metric
        self.requires = (metric,)
        self.share = share
        self.k = k
        self.min_progress = min_progress
        self.min_sigma = min_sigma
        self.release = release
        self.log_margin = math.log1p(init_margin)
        if above_rows not in (1, 2, 3):
            raise ValueError(f"above_rows={above_rows!r} is not allowed: one of 1, 2, 3")
        self.above_rows = above_rows
        self._y0: float | None = None
        self._ymin = math.inf
        self._last: deque[float] = deque(maxlen=3)
        self._d1 = RollingQuantiles(window)
        self._d2 = RollingQuantiles(window)
        self._active = False
        self._quiet = 0

    def _sigma(self) -> float:
        if len(self._d2) < 4:
            return self.min_sigma
        s1 = self._d1.median() * MAD1_TO_SIGMA
        s2 = self._d2.median() * MAD2_TO_SIGMA
        return max(s1, s2, self.min_sigma)

    def _update(self, step: int, metrics: Mapping[str, Any]) -> list[Event]:
        v = get_value(metrics, self.metric)
        if v is None or not math.isfinite(v) or v <= 0.0:
            return []
        y = math.log(v)
        last = self._last
        if len(last) == 3:
            self._d1.add(abs(y - last[-1]))
            self._d2.add(abs(y - 2 * last[-1] + last[-2]))
        last.append(y)
        if len(last) < 3:
            return []
        mid = median(last)
        if self._y0 is None:  # the loss at init: the median of the first 3 rows
            self._y0 = mid
        low = min(last)  # the rebound needs all 3 rows: a climb lasts, an excursion does not
        low_above = min(list(last)[-self.above_rows:])
        sigma = self._sigma()
        progress = self._y0 - self._ymin
        rise = low - self._ymin
        events = []
        if self._active:
            if rise < self.share * max(progress, 0.0) / 2:
                self._quiet += 1
                self._active = self._quiet < self.release
            else:
                self._quiet = 0
        else:
            rebound = progress >= self.min_progress * sigma and rise >= max(
                self.share * progress, self.k * sigma
            )
            above = low_above - self._y0 >= self._above_need(sigma)
            if rebound or above:
                self._active = True
                self._quiet = 0
                events.append(self._event(step, v, sigma, progress, rise, above and not rebound))
        self._ymin = min(self._ymin, mid)
        return events

    def _above_need(self, sigma: float) -> float:
        """How far (log units) above the loss at init the lowest of 3 rows must be: 1.5 k
        sigmas once the noise is measured; before that, ``init_margin`` (the loss at init is
        about ``ln(vocab)``, the loss of a model that predicts nothing, and barely varies from
        batch to batch: three rows well above it are a run that is unstable from the start)."""
        if len(self._d2) >= MIN_NOISE_ROWS:
            return ABOVE_FACTOR * self.k * sigma
        return self.log_margin

    def _event(
        self, step: int, v: float, sigma: float, progress: float, rise: float, above: bool
    ) -> Event:
        y0 = self._y0 if self._y0 is not None else 0.0
        if above:
            need = y0 + self._above_need(sigma)
            what = f"above its value at init {math.exp(y0):.4g}"
        else:
            need = self._ymin + max(self.share * progress, self.k * sigma)
            given = rise / progress if progress > 0 else math.inf
            what = (f"back {given:.0%} of the way from its low {math.exp(self._ymin):.4g} to "
                    f"its value at init {math.exp(y0):.4g}")
        return Event(
            step=step,
            detector=self.name,
            metric=self.metric,
            value=v,
            threshold=math.exp(need),
            score=rise / sigma,
            severity="warn",
            kind="spike",
            message=f"{self.metric}={v:.4g} (median of 3 rows) is {what}",
        )

    def _get_state(self) -> dict[str, Any]:
        return {
            "y0": self._y0,
            "ymin": self._ymin if math.isfinite(self._ymin) else None,
            "last": list(self._last),
            "d1": self._d1.to_list(),
            "d2": self._d2.to_list(),
            "active": self._active,
            "quiet": self._quiet,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._y0 = None if state["y0"] is None else float(state["y0"])
        self._ymin = math.inf if state["ymin"] is None else float(state["ymin"])
        self._last = deque((float(v) for v in state["last"]), maxlen=3)
        self._d1.load(state["d1"])
        self._d2.load(state["d2"])
        self._active = bool(state["active"])
        self._quiet = int(state["quiet"])
