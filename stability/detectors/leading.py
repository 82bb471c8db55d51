"""Leading detectors: statistics that grow abnormally fast before the loss moves.

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training
instabilities") trace two instabilities to runaway statistics: attention-logit growth (fixed
by QK-layernorm) and output-logit divergence (fixed by z-loss, which pins logsumexp). Large
update/parameter ratios precede both. Each detector here watches how fast one statistic grows
over a short horizon, relative to how fast it has been growing in this run.
"""

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
    register,
)


class GrowthDetector(BaseDetector):
    """Robust z-score of a statistic's growth over ``horizon`` steps, against its own history.

    With ``u = log(value)`` (``transform="log"``; for statistics that grow multiplicatively)
    or ``u = value`` (``"linear"``; for logsumexp, which drifts additively and can cross
    zero), the growth is ``g = (u_t - u_ref) * horizon / (t - ref)``, ``ref`` being the newest
    row at least ``horizon`` steps back (so gaps in logging are handled; growth is per
    ``horizon`` steps). The history is the last ``history`` growth values; its median and IQR
    sigma give ``z = (g - median) / sigma``. A row is a hit when ``z >= k`` and
    ``g - median >= floor`` (both sides with ``two_sided``); ``persist`` consecutive hits, or
    one hit with ``g - median >= floor_jump`` (a jump no noise makes), fire one ``leading``
    event. Growth values of hits are winsorised at ``gate`` sigmas before they
    enter the history, and none enter during an incident. The event re-arms after
    ``cooldown`` consecutive rows that are not hits.

    ``normalize_by`` divides the statistic by another key first (e.g. ``lr`` for update
    ratios, which are proportional to the learning rate). Off by default for update ratios: an
    LR that is suddenly too large is the explosion to catch, and the logged ``lr`` would hide
    it; linear warm-up grows the ratio by less than ``floor`` per horizon once the detector
    has its history.

    Args:
        metric: Key to watch.
        transform: ``log`` or ``linear``.
        normalize_by: Optional key to divide by (rows where it is missing or <= 0 skip).
        horizon: Growth horizon in steps.
        history: Growth values kept for the median and sigma.
        min_history: Growth values needed before the first check.
        k: Threshold in sigmas.
        floor: Minimum growth over the median per ``horizon`` steps (log units for ``log``:
            ``log(2)`` = doubling; the metric's units for ``linear``).
        floor_jump: Growth over the median that fires on a single row.
        two_sided: Also fire on fast decrease.
        persist: Consecutive hits needed.
        gate: Winsorising level (sigmas) for the history.
        cooldown: Non-hit rows that re-arm the event.
        min_sigma: Floor of sigma.
        ceiling: Optional absolute level: the first row with ``|value| >= ceiling`` fires
            (once; re-armed below half of it), whatever the growth history. Catches a run
            that is unstable from its first steps, whose history is all fast growth.
        smooth: Rows in a running median (or max) of ``u`` (odd; 1 = none). The growth is
            taken between medians, so one row that dips or jumps is neither a growth nor a
            reference to grow from; a growth that lasts is seen ``smooth // 2`` rows later.
        smooth_by: ``median`` or ``max``: the envelope of a statistic that is itself a
            maximum over sampled rows, whose dips are sampling artefacts (growth is seen at
            once; a blip stays ``smooth`` rows).
        min_value: With ``log``, values below it count as it: growth among values too small
            to matter (attention logits of 0.01 -> 1) is not growth.
        mute_while: A key (``loss``) whose fall mutes the rule: no hit while the median of
            its last ``horizon`` rows is more than ``fall`` (relative) below the median of the
            ``horizon`` rows before. A statistic that grows while the loss falls fast is the
            model learning (attention forming in early training), not a runaway.
        fall: See ``mute_while``.
    """

    def __init__(
        self,
        metric: str,
        transform: str = "log",
        normalize_by: str | None = None,
        horizon: int = 8,
        history: int = 200,
        min_history: int = 10,
        k: float = 6.0,
        floor: float = math.log(2.0),
        floor_jump: float = math.log(4.0),
        two_sided: bool = False,
        persist: int = 3,
        gate: float = 3.0,
        cooldown: int = 20,
        min_sigma: float = 1e-3,
        ceiling: float | None = None,
        smooth: int = 1,
        smooth_by: str = "median",
        min_value: float | None = None,
        mute_while: str | None = None,
        fall: float = 0.01,
    ) -> None:
        super().__init__(**init_args(locals()))
        if transform not in ("log", "linear"):
            raise ValueError(f"transform={transform!r} is not allowed: one of log, linear")
        if smooth < 1 or smooth % 2 == 0:
            raise ValueError(f"smooth={smooth!r} is not allowed: an odd number of rows >= 1")
        if smooth_by not in ("median", "max"):
            raise ValueError(f"smooth_by={smooth_by!r} is not allowed: one of median, max")
        self.smooth_max = smooth_by == "max"
        if min_value is not None and (transform != "log" or not min_value > 0):
            raise ValueError(f"min_value={min_value!r} is not allowed: > 0, with transform=log")
        self.metric = metric
        self.requires = tuple(k for k in (metric, normalize_by, mute_while) if k is not None)
        self.mute_while = mute_while
        self.fall = fall
        self._mute_buf: deque[float] = deque(maxlen=2 * horizon)
        self.log = transform == "log"
        self.normalize_by = normalize_by
        self.horizon = horizon
        self.min_history = min_history
        self.k = k
        self.floor = floor
        self.floor_jump = floor_jump
        self.two_sided = two_sided
        self.persist = persist
        self.gate = gate
        self.cooldown = cooldown
        self.min_sigma = min_sigma
        self.ceiling = ceiling
        self.min_value = min_value
        self._raw: deque[float] = deque(maxlen=smooth)
        self._above = False
        self._buf: deque[tuple[int, float]] = deque(maxlen=horizon + 1)
        self._rates = RollingQuantiles(history)
        self._hits = 0
        self._active = False
        self._quiet = 0

    def _value(self, metrics: Mapping[str, Any]) -> tuple[float, float] | None:
        v = get_value(metrics, self.metric)
        if v is None or not math.isfinite(v):
            return None
        u = v
        if self.normalize_by is not None:
            d = get_value(metrics, self.normalize_by)
            if d is None or not math.isfinite(d) or d <= 0.0:
                return None
            u = v / d
        if self.log:
            if self.min_value is not None:
                u = max(u, self.min_value)
            if u <= 0.0:
                return None
            u = math.log(u)
        return v, u

    def _update(self, step: int, metrics: Mapping[str, Any]) -> list[Event]:
        if self.mute_while is not None:
            w = get_value(metrics, self.mute_while)
            if w is not None and math.isfinite(w) and w > 0:
                self._mute_buf.append(math.log(w))
        got = self._value(metrics)
        if got is None:
            return []
        v, u = got
        events = self._check_ceiling(step, v)
        self._raw.append(u)
        if self.smooth_max:
            u = max(self._raw)
        elif len(self._raw) > 1:
            u = sorted(self._raw)[len(self._raw) // 2]
        ref = None
        for s, w in reversed(self._buf):
            if s <= step - self.horizon:
                ref = (s, w)
                break
        self._buf.append((step, u))
        if ref is None or step <= ref[0]:
            return events
        g = (u - ref[1]) * self.horizon / (step - ref[0])
        if len(self._rates) < self.min_history:
            self._rates.add(g)
            return events
        m = self._rates.median()
        sigma = max(self._rates.iqr_sigma(), self.min_sigma)
        d = g - m
        dd = abs(d) if self.two_sided else d
        z = dd / sigma
        hit = z >= self.k and dd >= self.floor and not self._falling()
        jump = hit and dd >= self.floor_jump
        self._hits = self._hits + 1 if hit else 0
        if self._active:
            self._quiet = 0 if hit else self._quiet + 1
            if self._quiet >= self.cooldown:
                self._active = False
        elif self._hits >= self.persist or jump:
            self._active = True
            self._quiet = 0
            events.append(self._event(step, v, d, m, sigma, z))
        if not self._active:
            lim = self.gate * sigma
            self._rates.add(m + max(-lim, min(lim, d)) if hit or z >= self.gate else g)
        return events

    def _falling(self) -> bool:
        """Whether ``mute_while``'s metric fell by more than ``fall`` over the last horizon."""
        b = self._mute_buf
        if self.mute_while is None or len(b) < b.maxlen:
            return False
        h = b.maxlen // 2
        old, new = sorted(list(b)[:h]), sorted(list(b)[h:])
        return new[h // 2] < old[h // 2] + math.log1p(-self.fall)

    def _check_ceiling(self, step: int, v: float) -> list[Event]:
        """One event when ``|value|`` first reaches ``ceiling`` (re-armed below half of it)."""
        if self.ceiling is None:
            return []
        a = abs(v)
        if a < self.ceiling / 2:
            self._above = False
        if a < self.ceiling or self._above:
            return []
        self._above = True
        if self._active:
            return []
        self._active = True
        self._quiet = 0
        return [
            Event(
                step=step,
                detector=self.name,
                metric=self.metric,
                value=v,
                threshold=self.ceiling,
                score=a / self.ceiling,
                severity="warn",
                kind="leading",
                message=f"{self.metric}={v:.4g} reached the ceiling {self.ceiling:g}",
            )
        ]

    def _event(self, step: int, v: float, d: float, m: float, sigma: float, z: float) -> Event:
        need = max(self.k * sigma, self.floor)
        unit = "x" if self.log else ""
        grew = f"{math.exp(d):.2f}x" if self.log else f"{d:+.3g}"
        lim = f"{math.exp(need):.2f}{unit}" if self.log else f"{need:.3g}"
        return Event(
            step=step,
            detector=self.name,
            metric=self.metric,
            value=v,
            threshold=need,
            score=z,
            severity="warn",
            kind="leading",
            message=f"{self.metric} grew {grew} over {self.horizon} steps beyond its usual "
            f"growth (needs {lim}; z={z:.1f})",
        )

    def _get_state(self) -> dict[str, Any]:
        return {
            "buf": [list(p) for p in self._buf],
            "raw": list(self._raw),
            "mute": list(self._mute_buf),
            "rates": self._rates.to_list(),
            "hits": self._hits,
            "active": self._active,
            "quiet": self._quiet,
            "above": self._above,
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self._buf = deque(((int(s), float(u)) for s, u in state["buf"]), maxlen=self.horizon + 1)
        # states saved before ``smooth`` existed have no raw rows: the median restarts
        self._raw = deque((float(u) for u in state.get("raw", [])), maxlen=self._raw.maxlen)
        self._mute_buf = deque((float(u) for u in state.get("mute", [])),
                               maxlen=self._mute_buf.maxlen)
        self._rates.load(state["rates"])
        self._hits = int(state["hits"])
        self._active = bool(state["active"])
        self._quiet = int(state["quiet"])
        self._above = bool(state["above"])


@register("attn_logit_growth")
class AttnLogitGrowth(GrowthDetector):
    """Attention-logit growth (``attn_logit_max``, max over layers): log-growth z-score.

    No absolute ceiling by default (``ceiling`` sets one): the level of the max attention
    logit does not separate stable from unstable runs. It depends on the init scale and the
    LR, not on whether the run is healthy: our calm GPT run at LR 0.03 without warm-up grows
    from 0.006 to 300 in 26 steps (x50,000), GPT runs at LR 0.3 that train on pass 1000 at
    step 12-16, and runs unstable from the start pass it only ~5 steps after their loss has
    moved. A ceiling of 1000 fired outside every incident on two of the real runs.
    """

    fixed_params = ("transform",)

    def __init__(
        self,
        metric: str = "attn_logit_max",
        floor: float = math.log(2.0),
        floor_jump: float = math.log(3.0),
        ceiling: float | None = None,
        smooth: int = 9,
        smooth_by: str = "max",
        min_value: float | None = 1.0,
        mute_while: str | None = "loss",
        **kw: Any,
    ) -> None:
        super().__init__(
            metric=metric,
            transform="log",
            floor=floor,
            floor_jump=floor_jump,
            ceiling=ceiling,
            smooth=smooth,
            smooth_by=smooth_by,
            min_value=min_value,
            mute_while=mute_while,
            **kw,
        )


@register("logsumexp_drift")
class LogsumexpDrift(GrowthDetector):
    """Output-logit drift (``logsumexp_mean``): two-sided linear drift z-score, in nats."""

    fixed_params = ("transform",)

    def __init__(
        self,
        metric: str = "logsumexp_mean",
        floor: float = 2.0,
        floor_jump: float = 6.0,
        two_sided: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(
            metric=metric,
            transform="linear",
            floor=floor,
            floor_jump=floor_jump,
            two_sided=two_sided,
            **kw,
        )


@register("update_ratio_growth")
class UpdateRatioGrowth(GrowthDetector):
    """Update/parameter ratio explosion (``update_ratio_max``): log-growth z-score.

    Also fires when the ratio reaches ``ceiling`` (1 by default): a step that moves a layer's
    weights by more than their own norm replaces the layer rather than training it. With
    Adam's first steps (updates of about the LR per weight) that is an LR at or above the
    weights' scale; our no-warm-up runs at LR 0.1-1 showed ratios of 1.5-19 at step 1 and blew
    up at step 2-3, while healthy runs stay below ~0.5 (large runs: ~1e-3).
    """

    fixed_params = ("transform",)

    def __init__(
        self,
        metric: str = "update_ratio_max",
        normalize_by: str | None = None,
        floor: float = math.log(1.5),
        floor_jump: float = math.log(3.0),
        ceiling: float | None = 1.0,
        **kw: Any,
    ) -> None:
        super().__init__(
            metric=metric,
            transform="log",
            normalize_by=normalize_by,
            floor=floor,
            floor_jump=floor_jump,
            ceiling=ceiling,
            **kw,
        )
