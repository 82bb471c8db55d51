"""Loss spikes against a robust local trend, so a falling curve does not hide them."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from stability.detectors.base import (
    MAD_TO_SIGMA,
    BaseDetector,
    Event,
    RollingQuantiles,
    get_value,
    init_args,
    median,
    register,
)

MIN_RESIDUALS = 16
"""Out-of-sample residuals needed before the scale uses them (until then: in-sample MAD)."""
DRIFT_ROWS = 8
"""While the median residual of the last this many rows is a sigma or more above the trend (the
loss drifting up), accepted rows feed the baseline but not the noise scale (once the scale's long
window is half full: a young trend lags the curve and its residuals lean one way)."""


def _normal_quantile(p: float) -> float:
    """The standard normal's ``p``-quantile (bisection on ``erf``; called once per detector)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@register("loss_spike")
class TrendSpikeDetector(BaseDetector):
    """Residuals against a robust local power-law trend, with thresholds in noise sigmas.

    Each row's value ``y = log(loss)`` is compared with a prediction from the baseline, the
    last accepted rows, in ``x = log(step + 1)`` (a local power law ``loss ~ c * step^-a``;
    log-log axes keep the steep, convex early curve nearly straight). The slope is Tukey's
    resistant line over ``slope_window`` rows (medians of the first and last thirds), capped
    at ``max_rise`` (0: the baseline may fall or stay flat, never climb, so a slow blow-up
    cannot drag it along; a slow benign drift is followed by the level); the intercept is
    the median of ``y - slope * x`` over the last ``window`` rows. A rolling median or mean
    would lag a falling curve by half its window and hide spikes under it; the slope removes
    that lag.

    The residual ``r = y - prediction`` (a log ratio: 0.1 = 10.5% above trend) is measured in
    the run's own noise: sigma is the larger of the inter-quartile sigma of recent one-step-
    ahead residuals (a ``resid_window`` and a ``short_window`` estimate, so a noisier stretch
    raises it within a few rows) and a tail sigma (the ``tail_quantile`` of the absolute
    residuals of the last ``tail_window`` benign rows, as a Gaussian would have it), so heavy-
    tailed noise raises the thresholds too; never below ``min_sigma``. Two rules fire:

    - large: one row with ``r >= k_single * sigma``, or a row with ``r >= k_large * sigma``
      whose next row is still at least ``k_confirm * sigma`` above trend (flagged on that row:
      a lone row between the two levels is what heavy-tailed noise makes, every few thousand
      rows of Laplace noise; a loss spike outlasts its first row);
    - sustained: the median of the last ``persist`` rows ``>= k_sustained * sigma``, none of
      them under ``sustained_min * sigma``.

    So a 6% jump is a spike on a curve with 0.5% noise, and a 20% hard batch is not one on a
    curve with 5% noise. ``floor_large`` / ``floor_sustained`` add optional relative floors
    (shares of the loss; 0 by default: a fixed share ignores the noise, see docs/detectors.md).

    Robustness: rows at or above ``lo = gate * sigma`` are held out of the baseline and the
    scale; when the run of such rows ends without an event (hard batches) or grows past
    ``hold_max`` rows (a level change), they enter winsorised at ``lo`` (the tail sigma takes
    their true size, capped at the large threshold). Rows of an incident never enter, until it
    ends.

    One event per incident (documented refractory): after firing, no event until ``release``
    consecutive rows are back under ``lo``. An incident longer than ``max_incident`` rows (a
    plateau, a divergence) re-bases the baseline flat at the recent level (and, until the
    baseline has refilled, the slope may not be steeper than before the incident: a recovery
    is not the learning curve) and keeps waiting for ``release`` quiet rows; a divergence
    therefore fires once, or once more per ``max_incident`` rows if it keeps accelerating.

    Rows logged every N steps work: the slope is per step; ``persist``, ``release`` and the
    windows count rows (``persist=3`` rows of a run logged every 10 steps span 30 steps).
    Rows with a missing, non-finite or non-positive value are skipped.

    Args:
        metric: Key to watch (positive values).
        window: Rows for the trend's level (intercept).
        slope_window: Rows for the trend's slope (the baseline's length).
        min_history: Rows needed before the first check.
        resid_window: Long window of residuals for the scale (and the tail sigma).
        short_window: Short window of residuals for the scale.
        k_large: Large rule, in sigmas (confirmed by the next row being held out too).
        k_single: Large rule on a single row, in sigmas (``<= k_large``: no confirmation).
        k_confirm: What the row after a ``k_large`` row must reach, in sigmas (a spike that
            decays over a row or more keeps 37% of its size: 3 sigmas of an 8-sigma spike).
        floor_large: Large rule, optional relative floor (0.2 = 20% above trend; 0 = none).
        k_sustained: Sustained rule, in sigmas (on the median of ``persist`` rows).
        floor_sustained: Sustained rule, optional relative floor (0 = none).
        persist: Rows the sustained rule looks at.
        sustained_min: The sustained rule also needs every one of those rows this many sigmas
            above trend (two hard batches and a noisy row between them are not a plateau).
        gate: Rows at least ``gate`` sigmas above trend are held out of the baseline.
        hold_max: Held-out rows before they enter winsorised.
        release: Quiet rows that end an incident.
        max_incident: Incident rows before the baseline is re-based.
        min_sigma: Floor of the scale (log units).
        tail_quantile: Quantile of the absolute benign residuals for the tail sigma (0 = off).
        tail_window: Benign rows the tail sigma looks at.
        max_rise: Largest upward trend slope (relative rise per step) the fit may follow.
        early_jump: Before ``min_history`` rows (no trend, no noise measured yet): a row this
            far above the median of the 3 rows before it (0.3 = 30%) fires (one event per
            run of such rows; they stay out of the baseline for ``hold_max`` rows, then the
            level has moved and they enter it). 0 = off.
    """

    requires = ("loss",)

    def __init__(
        self,
        metric: str = "loss",
        window: int = 64,
        slope_window: int = 64,
        min_history: int = 12,
        resid_window: int = 64,
        short_window: int = 16,
        k_large: float = 7.0,
        k_single: float = 10.0,
        k_confirm: float = 3.0,
        floor_large: float = 0.0,
        k_sustained: float = 3.5,
        floor_sustained: float = 0.0,
        persist: int = 3,
        sustained_min: float = 2.5,
        gate: float = 2.0,
        hold_max: int = 5,
        release: int = 3,
        max_incident: int = 100,
        min_sigma: float = 0.001,
        tail_quantile: float = 0.95,
        tail_window: int = 64,
        max_rise: float = 0.0,
        early_jump: float = 0.3,
    ) -> None:
        super().__init__(**init_args(locals()))
        if not (6 <= min_history <= slope_window and 4 <= window <= slope_window):
            raise ValueError("loss_spike needs 6 <= min_history, 4 <= window, both <= slope_window")
        if not 0.0 <= tail_quantile < 1.0:
            raise ValueError(f"tail_quantile={tail_quantile!r} is not allowed: in [0, 1)")
        self.metric = metric
        self.requires = (metric,)
        self.window = window
        self.slope_window = slope_window
        self.min_history = min_history
        self.k_large = k_large
        self.k_single = k_single
        self.k_confirm = k_confirm
        self.log_large = math.log1p(floor_large)
        self.k_sustained = k_sustained
        self.log_sustained = math.log1p(floor_sustained)
        self.persist = persist
        self.sustained_min = sustained_min
        self.gate = gate
        self.hold_max = hold_max
        self.release = release
        self.max_incident = max_incident
        self.min_sigma = min_sigma
        self.tail_quantile = tail_quantile

        self.tail_z = _normal_quantile(0.5 + tail_quantile / 2) if tail_quantile else 1.0
        self.max_rise = max_rise
        self.log_early_jump = math.log1p(early_jump) if early_jump > 0 else math.inf
        self._early_held = 0
        self._drift: deque[float] = deque(maxlen=DRIFT_ROWS)
        self._frozen = False
        self._hist: deque[tuple[float, float]] = deque(maxlen=slope_window)
        self._recent: deque[tuple[float, float]] = deque(maxlen=min_history)
        self._res_long = RollingQuantiles(resid_window)
        self._res_short = RollingQuantiles(short_window)
        self._tail = RollingQuantiles(tail_window)

        self._pending: list[tuple[float, float, float]] = []
        self._candidate: list[float] | None = None  # a large row awaiting its confirmation
        self._last: deque[float] = deque(maxlen=persist)
        self._incident = False
        self._incident_rows = 0
        self._quiet = 0
        self._slope = 0.0
        self._slope_at_fire = 0.0
        self._slope_floor: float | None = None
        self._floor_rows = 0

    # --- the trend and the scale ---------------------------------------------------------

    def _fit(self, step: int) -> tuple[float, float]:
        """Resistant line through the baseline: (intercept, slope).

        Slope: Tukey's resistant line (medians of the first and last thirds) over the whole
        baseline (``slope_window`` rows), at most a rise of ``max_rise`` per step at ``step``
        (a loss that climbs faster than a slow drift is what this detector looks for, so the
        trend must not follow it). Intercept: the median of ``y - slope * x`` over the last
        ``window`` rows, so the level follows the curve closely.
        """
        xs, ys = zip(*self._hist)
        n = len(xs)
        k = n // 3
        h = k // 2  # xs increase: the median of a third is its middle
        xl = xs[h] if k % 2 else 0.5 * (xs[h - 1] + xs[h])
        xr = xs[n - k + h] if k % 2 else 0.5 * (xs[n - k + h - 1] + xs[n - k + h])
        yl, yr = median(ys[:k]), median(ys[n - k :])
        b = (yr - yl) / (xr - xl) if xr > xl else 0.0
        b = min(b, self.max_rise * (step + 1.0))
        if self._slope_floor is not None:  # after a re-base: no steeper than before the incident
            b = max(b, self._slope_floor)
        m = min(n, self.window)
        a = median([y - b * x for x, y in zip(xs[n - m :], ys[n - m :])])
        return a, b

    def _sigma(self, a: float, b: float) -> float:
        if len(self._res_long) >= MIN_RESIDUALS:
            s = self._res_long.iqr_sigma()
            if len(self._res_short) >= self._res_short.size // 2:
                s = max(s, self._res_short.iqr_sigma())
            if self.tail_quantile and len(self._tail) >= 16:
                s = max(s, self._tail.quantile(self.tail_quantile) / self.tail_z)
        else:  # too few out-of-sample residuals yet: in-sample MAD, inflated
            res = [y - a - b * x for x, y in self._hist]
            s = 2.0 * MAD_TO_SIGMA * median(abs(r) for r in res)
        return max(s, self.min_sigma)

    def _accept(self, x: float, y: float, r: float, true_r: float | None = None) -> None:
        if self._slope_floor is not None:
            self._floor_rows -= 1
            if self._floor_rows <= 0:
                self._slope_floor = None
        self._hist.append((x, y))
        if self._frozen:  # the loss is drifting up: its rows must not widen the noise scale
            return
        self._res_long.add(r)
        self._res_short.add(r)
        self._tail.add(abs(r if true_r is None else true_r))

    def _flush_pending(self, lo: float, cap: float) -> None:
        for x, y, r in self._pending:
            self._accept(x, y - r + lo, lo, min(r, cap))
        self._pending.clear()

    # --- the stream ----------------------------------------------------------------------

    def _update(self, step: int, metrics: Mapping[str, Any]) -> list[Event]:
        v = get_value(metrics, self.metric)
        if v is None or not math.isfinite(v) or v <= 0.0:
            return []
        x = math.log(max(step, 0) + 1.0)
        y = math.log(v)
        self._recent.append((x, y))
        if len(self._hist) < self.min_history:
            return self._early(step, v, x, y)
        a, b = self._fit(step)
        self._slope = b
        pred = a + b * x
        sigma = self._sigma(a, b)
        r = y - pred
        lo = self.gate * sigma
        if not self._incident:
            self._drift.append(r)
            self._frozen = (len(self._drift) == DRIFT_ROWS and median(self._drift) >= sigma
                            and len(self._res_long) >= self._res_long.size // 2)
        large = max(self.k_large * sigma, self.log_large)

        if self._incident:
            self._incident_rows += 1
            if r < lo:
                self._quiet += 1
                self._accept(x, y, r)
                if self._quiet >= self.release:
                    self._incident = False
            else:
                self._quiet = 0
            if self._incident and self._incident_rows >= self.max_incident:
                # flat at the recent level; until the baseline has refilled, the slope may not
                # be steeper than before the incident (a recovery is not the learning curve)
                level = median(p[1] for p in self._recent)
                self._hist = deque(((p[0], level) for p in self._recent), maxlen=self.slope_window)
                self._incident_rows = 0
                self._slope_floor = min(self._slope_at_fire, 0.0)
                self._floor_rows = self.slope_window
            return []

        candidate, self._candidate = self._candidate, None
        if candidate is not None and r >= self.k_confirm * sigma:  # the next row is still high
            c_step, c_v, _, c_r, _, c_sigma = candidate
            what = (f"{self.metric}={c_v:.4g} at step {int(c_step)} was {math.expm1(c_r):+.0%} "
                    f"vs trend ({c_r / c_sigma:.1f} sigma) and {v:.4g} is still "
                    f"{r / sigma:.1f} sigma above it (large, confirmed)")
            return [self._fire(step, v, pred, c_r, lo, c_sigma, "", message=what)]
        if r >= large and r >= max(self.k_single * sigma, self.log_large):
            return [self._fire(step, v, pred, r, large, sigma, "large")]
        if r >= large and self._last and self._last[-1] >= self.k_confirm * sigma:
            # the row before was already up: a spike that builds over two rows is confirmed
            return [self._fire(step, v, pred, r, large, sigma, "large, after a rising row")]
        if r >= large:  # a lone row this high may be a heavy-tailed noise row: wait one row
            self._candidate = [float(step), v, pred, r, large, sigma]
        self._last.append(r)
        # the sustained rule needs the noise measured out of sample: its 3.5 sigmas are a few
        # percent, and the first rows' in-sample scale is no estimate of that
        if len(self._last) == self.persist and len(self._res_long) >= MIN_RESIDUALS:
            mid = median(self._last)
            need = max(self.k_sustained * sigma, self.log_sustained)
            if mid >= need and min(self._last) >= self.sustained_min * sigma:
                return [self._fire(step, v, pred, mid, need, sigma, "sustained")]
        if r >= lo:
            self._pending.append((x, y, r))
            if len(self._pending) > self.hold_max:
                self._flush_pending(lo, large)
            return []
        self._flush_pending(lo, large)
        self._accept(x, y, r)
        return []

    def _early(self, step: int, v: float, x: float, y: float) -> list[Event]:
        """Before the trend exists: a row ``early_jump`` above the median of the 3 rows before
        it is a spike (the loss does not rise 30% in a step in a run that trains; in the first
        rows of our study runs, hard batches stay within ~10%)."""
        prior = [p[1] for p in list(self._hist)[-3:]]
        ref_y = median(prior) if len(prior) == 3 else math.inf
        jump = y - ref_y >= self.log_early_jump
        if not jump:
            self._hist.append((x, y))
            self._early_held = 0
            return []
        if self._early_held >= self.hold_max:  # the level has moved: into the baseline
            self._hist.append((x, y))
            return []
        self._early_held += 1
        if self._early_held > 1:  # the same incident: still out of the baseline, no new event
            return []
        ref = math.exp(ref_y)
        return [Event(step=step, detector=self.name, metric=self.metric, value=v,
                      threshold=ref * math.exp(self.log_early_jump),
                      score=(y - ref_y) / self.log_early_jump, severity="warn",
                      kind="spike",
                      message=f"{self.metric}={v:.4g} is {v / ref - 1:+.0%} over the median "
                      f"{ref:.4g} of the 3 rows before it (large, early: before the trend "
                      f"has its {self.min_history} rows)")]

    def _fire(
        self, step: int, v: float, pred: float, r: float, need: float, sigma: float, rule: str,
        message: str = "",
    ) -> Event:
        self._candidate = None
        self._incident = True
        self._incident_rows = 0
        self._quiet = 0
        self._slope_at_fire = self._slope
        self._pending.clear()
        self._last.clear()
        trend = math.exp(pred)
        return Event(
            step=step,
            detector=self.name,
            metric=self.metric,
            value=v,
            threshold=trend * math.exp(need),
            score=r / sigma,
            severity="warn",
            kind="spike",
            message=message or f"{self.metric}={v:.4g} is {math.expm1(r):+.0%} vs trend "
            f"{trend:.4g} ({rule}, {r / sigma:.1f} sigma)",
        )

    # --- state ---------------------------------------------------------------------------

    def _get_state(self) -> dict[str, Any]:
        return {
            "hist": [list(p) for p in self._hist],
            "recent": [list(p) for p in self._recent],
            "early_held": self._early_held,
            "res_long": self._res_long.to_list(),
            "res_short": self._res_short.to_list(),
            "tail": self._tail.to_list(),
            "drift": list(self._drift),

            "frozen": self._frozen,
            "pending": [list(p) for p in self._pending],
            "candidate": self._candidate,
            "last": list(self._last),
            "incident": self._incident,
            "incident_rows": self._incident_rows,
            "quiet": self._quiet,
            "slope": self._slope,
            "slope_at_fire": self._slope_at_fire,
            "slope_floor": self._slope_floor,
            "floor_rows": self._floor_rows,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._hist = deque((tuple(p) for p in state["hist"]), maxlen=self.slope_window)
        self._recent = deque((tuple(p) for p in state["recent"]), maxlen=self.min_history)
        self._early_held = int(state.get("early_held", 0))
        self._res_long.load(state["res_long"])
        self._res_short.load(state["res_short"])
        # absent in states saved before they existed
        self._tail.load(state.get("tail", []))
        self._drift = deque((float(v) for v in state.get("drift", [])), maxlen=DRIFT_ROWS)
        self._frozen = bool(state.get("frozen", False))

        self._pending = [tuple(p) for p in state["pending"]]
        cand = state.get("candidate")
        self._candidate = None if cand is None else [float(c) for c in cand]
        self._last = deque((float(r) for r in state["last"]), maxlen=self.persist)
        self._incident = bool(state["incident"])
        self._incident_rows = int(state["incident_rows"])
        self._quiet = int(state["quiet"])
        self._slope = float(state["slope"])
        self._slope_at_fire = float(state["slope_at_fire"])
        self._slope_floor = state["slope_floor"]
        self._floor_rows = int(state["floor_rows"])
