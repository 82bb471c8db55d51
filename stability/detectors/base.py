"""The detector interface: events, the ``Detector`` protocol, the registry and shared helpers.

Detectors read numbers only (one ``metrics.jsonl`` row at a time) and never import torch, so
the same code runs live in the training loop and offline on a finished run's metrics.
"""

from __future__ import annotations

import inspect
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol, TypeVar, runtime_checkable

from stability.errors import ConfigError

SEVERITIES = ("warn", "error")
"""``warn``: something to look at (spikes, leading signs). ``error``: the run is broken."""

KINDS = ("spike", "nonfinite", "leading")
"""``spike``: the watched value jumped; ``nonfinite``: NaN/Inf; ``leading``: a statistic that
usually moves before the loss grows abnormally fast."""

MAD_TO_SIGMA = 1.4826
"""Median absolute deviation -> standard deviation for Gaussian data."""

IQR_TO_SIGMA = 1.0 / 1.349
"""Inter-quartile range -> standard deviation for Gaussian data."""


@dataclass(frozen=True)
class Event:
    """One detector event: one line of ``events.jsonl``.

    Attributes:
        step: Training step of the metrics row that triggered the event.
        detector: Registry name of the detector.
        metric: The metrics key the event is about (``loss``, ``grad_norm``, ...).
        value: The value of ``metric`` at ``step`` (may be NaN/Inf for ``nonfinite``).
        threshold: The value ``metric`` had to reach to trigger (in the metric's own units;
            NaN where a threshold makes no sense, e.g. non-finite values).
        score: How far past the threshold, in the detector's own scale (usually a robust
            z-score; the ratio to the reference for the ratio baselines).
        severity: ``warn`` or ``error`` (non-finite values are ``error``).
        kind: ``spike``, ``nonfinite`` or ``leading``.
        action: Filled in by the action policy (``log``, ``skip_step``, ...); empty here.
        message: One human-readable line (for alerts and the console).
    """

    step: int
    detector: str
    metric: str
    value: float
    threshold: float
    score: float
    severity: str = "warn"
    kind: str = "spike"
    action: str = ""
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON-ready dict (NaN/Inf stay floats, as Python's json writes them)."""
        return asdict(self)

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> Event:
        """Inverse of :meth:`to_json`; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

    def with_action(self, action: str) -> Event:
        """A copy with ``action`` filled in (events are frozen)."""
        return Event(**{**asdict(self), "action": action})


@runtime_checkable
class Detector(Protocol):
    """A streaming detector.

    ``update`` is called once per metrics row, in step order, live or offline. A row is a
    mapping of metric name to value; keys the detector reads but the row lacks are skipped
    (the detector's state does not change for them), so rows logged every N steps and rows
    without monitor metrics are fine. ``state_dict`` is JSON-serialisable and, loaded into a
    fresh detector built with the same parameters, continues the stream exactly.
    """

    name: str
    requires: tuple[str, ...]

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[Event]:
        """Consume one metrics row; return the events it triggers (usually none)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: everything needed to continue the stream."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`'s output."""
        ...


REGISTRY: dict[str, type] = {}
"""Detector classes by registry name (the names a config's ``detectors`` list holds)."""

D = TypeVar("D", bound=type)


def register(name: str) -> Callable[[D], D]:
    """Class decorator: add a detector class to :data:`REGISTRY` under ``name``."""

    def deco(cls: D) -> D:
        if name in REGISTRY:
            raise ValueError(f"detector {name!r} registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def allowed_params(name: str) -> list[str]:
    """Keyword parameters the detector ``name`` accepts (following ``**kwargs`` up the MRO)."""
    cls = REGISTRY[name]
    fixed = getattr(cls, "fixed_params", ())
    out: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        more = False
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                more = True
            elif p.name != "self" and p.kind is not p.VAR_POSITIONAL and p.name not in out:
                out.append(p.name)
        if not more:
            break
    return [p for p in out if p not in fixed]


def build_detectors(
    names: Iterable[str], params: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Any]:
    """Build detectors by registry name.

    Args:
        names: Registry names, in the order their events should be reported.
        params: Optional keyword arguments per detector name, e.g.
            ``{"loss_spike": {"floor_large": 0.3}}``.

    Returns:
        One fresh detector per name.

    Raises:
        ConfigError: An unknown or repeated name, parameters for a detector not in ``names``,
            or an unknown parameter (the message names the bad value and the allowed ones).
    """
    names = list(names)
    params = dict(params or {})
    allowed = ", ".join(sorted(REGISTRY))
    seen: set[str] = set()
    for n in names:
        if n not in REGISTRY:
            raise ConfigError("detectors", n, f"one of {allowed}")
        if n in seen:
            raise ConfigError("detectors", n, "each detector name at most once")
        seen.add(n)
    for n, kw in params.items():
        if n not in seen:
            raise ConfigError("detectors.params", n, f"one of the chosen detectors {names}")
        ok = allowed_params(n)
        for k in kw:
            if k not in ok:
                raise ConfigError(f"detectors.params.{n}", k, f"one of {', '.join(ok)}")
    return [REGISTRY[n](**dict(params.get(n, {}))) for n in names]


def init_args(local: Mapping[str, Any]) -> dict[str, Any]:
    """An ``__init__``'s keyword arguments, from its ``locals()`` taken before anything else."""
    return {k: v for k, v in local.items() if k not in ("self", "__class__")}


class BaseDetector:
    """Shared plumbing: parameter record, state versioning, value lookup.

    Subclasses set ``requires``, keep their streaming state in plain attributes, and implement
    ``_update``, ``_get_state`` and ``_set_state``.
    """

    name = "base"
    requires: tuple[str, ...] = ()
    version = 1

    def __init__(self, **params: Any) -> None:
        self.params = params

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[Event]:
        """See :class:`Detector`."""
        return self._update(int(step), metrics)

    def _update(self, step: int, metrics: Mapping[str, Any]) -> list[Event]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """See :class:`Detector`."""
        return {"detector": self.name, "version": self.version, "state": self._get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """See :class:`Detector`.

        Raises:
            ValueError: The state belongs to another detector or version.
        """
        if state.get("detector") != self.name or state.get("version") != self.version:
            raise ValueError(
                f"state of detector {state.get('detector')!r} v{state.get('version')} cannot be "
                f"loaded into {self.name!r} v{self.version}"
            )
        self._set_state(state["state"])

    def _get_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _set_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        kw = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({kw})"


def get_value(metrics: Mapping[str, Any], key: str) -> float | None:
    """``metrics[key]`` as a float, or None when absent, null or not a number."""
    v = metrics.get(key)
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def median(values: Iterable[float]) -> float:
    """Median of a non-empty iterable."""
    s = sorted(values)
    n = len(s)
    m = n // 2
    return s[m] if n % 2 else 0.5 * (s[m - 1] + s[m])


class RollingQuantiles:
    """A window of the last ``size`` values with O(log n) median and quartiles.

    Keeps the values in arrival order (a deque, for eviction and for the state) and sorted
    (for quantiles). Its state is the arrival-order list; the sorted copy is rebuilt on load.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.order: deque[float] = deque()
        self.sorted: list[float] = []

    def __len__(self) -> int:
        return len(self.order)

    def add(self, x: float) -> None:
        """Append ``x``, evicting the oldest value when full."""
        if len(self.order) == self.size:
            old = self.order.popleft()
            del self.sorted[bisect_left(self.sorted, old)]
        self.order.append(x)
        insort(self.sorted, x)

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile (0 <= q <= 1) of the window; the window is non-empty."""
        s = self.sorted
        pos = q * (len(s) - 1)
        i = int(pos)
        if i + 1 >= len(s):
            return s[-1]
        return s[i] + (pos - i) * (s[i + 1] - s[i])

    def median(self) -> float:
        """Median of the window."""
        return self.quantile(0.5)

    def iqr_sigma(self) -> float:
        """Robust standard deviation: inter-quartile range / 1.349."""
        return (self.quantile(0.75) - self.quantile(0.25)) * IQR_TO_SIGMA

    def to_list(self) -> list[float]:
        """Values in arrival order (for ``state_dict``)."""
        return list(self.order)

    def load(self, values: Iterable[float]) -> None:
        """Replace the window by ``values`` (arrival order)."""
        self.order = deque(float(v) for v in values)
        self.sorted = sorted(self.order)
