"""Running detectors as one suite, live or offline on a ``metrics.jsonl``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from stability.detectors.base import Event, build_detectors


class DetectorSuite:
    """Several detectors fed the same rows: what the training loop's callback holds.

    Args:
        detectors: Built detectors with distinct names (see :func:`build_detectors`).
    """

    def __init__(self, detectors: Iterable[Any]) -> None:
        self.detectors = list(detectors)
        names = [d.name for d in self.detectors]
        if len(set(names)) != len(names):
            raise ValueError(f"detector names must be distinct: {names}")

    @classmethod
    def from_names(
        cls, names: Iterable[str], params: Mapping[str, Mapping[str, Any]] | None = None
    ) -> DetectorSuite:
        """Build from registry names (raises ``ConfigError`` on a bad name or parameter)."""
        return cls(build_detectors(names, params))

    @property
    def names(self) -> list[str]:
        """Registry names, in order."""
        return [d.name for d in self.detectors]

    @property
    def requires(self) -> tuple[str, ...]:
        """Every metrics key some detector reads."""
        out: dict[str, None] = {}
        for d in self.detectors:
            out.update(dict.fromkeys(d.requires))
        return tuple(out)

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[Event]:
        """Feed one row to every detector; their events, in detector order."""
        events: list[Event] = []
        for d in self.detectors:
            events.extend(d.update(step, metrics))
        return events

    def state_dict(self) -> dict[str, Any]:
        """``{"detectors": {name: state}}``, JSON-serialisable."""
        return {"detectors": {d.name: d.state_dict() for d in self.detectors}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore each detector found in ``state``; a detector absent there starts fresh."""
        saved = state.get("detectors", {})
        for d in self.detectors:
            if d.name in saved:
                d.load_state_dict(saved[d.name])


def read_metrics(path: Path | str) -> Iterator[dict[str, Any]]:
    """Rows of a ``metrics.jsonl``, in file order.

    NaN/Infinity tokens (Python's json) are read as floats. A last line that does not parse
    (a run killed mid-write) is dropped; a bad line before the last raises.

    Raises:
        ValueError: A malformed line other than the last, or a row that is not an object with
            a ``step``.
    """
    path = Path(path)
    with path.open() as f:
        pending: tuple[int, str] | None = None
        for n, line in enumerate(f, 1):
            if pending is not None:
                yield _parse(path, *pending)
            pending = (n, line) if line.strip() else None
        if pending is not None:
            try:
                yield _parse(path, *pending)
            except ValueError:
                return


def _parse(path: Path, n: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n} is not JSON ({e})") from None
    if not isinstance(row, dict) or "step" not in row:
        raise ValueError(f"{path}:{n} is not a JSON object with a 'step'")
    return row


def replay(rows: Iterable[Mapping[str, Any]], detectors: Iterable[Any]) -> list[Event]:
    """Feed rows, in order, to the detectors; all events, in row then detector order."""
    suite = detectors if isinstance(detectors, DetectorSuite) else DetectorSuite(detectors)
    events: list[Event] = []
    for row in rows:
        events.extend(suite.update(int(row["step"]), row))
    return events
