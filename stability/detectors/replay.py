"""Running detectors as one suite, live or offline on a ``metrics.jsonl``."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from stability.detectors.base import Event, build_detectors
from stability.runfiles import iter_jsonl

log = logging.getLogger(__name__)


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
    """Rows of a ``metrics.jsonl``, in file order, read by the one reader of run files
    (``stability.runfiles.iter_jsonl``): NaN/Infinity tokens are floats, a torn last line is
    dropped, a bad line elsewhere is reported with its line number and skipped, and a row
    without a ``step`` is skipped likewise."""
    for row in iter_jsonl(path):
        if "step" in row:
            yield row
        else:
            log.warning("%s: skipping a row without a 'step': %s", path, row)
