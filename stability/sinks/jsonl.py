"""metrics.jsonl and events.jsonl: one JSON object per line, appended as the run goes.

NaN and Infinity are written as Python's json writes them. On a resume metrics.jsonl is cut back
to the checkpoint's step, so every step appears once however often the run was interrupted; on
a rollback it is cut back too (the rolled-back steps are replaced). events.jsonl is a record in
the order things happened: a rollback keeps the events that caused it, and a resume cuts the
file back to the lines it had when the checkpoint was written (the count is in the checkpoint),
so events of a trajectory a rollback abandoned before that checkpoint stay. Reading, writing and
cutting go through ``stability.runfiles`` (one torn-line policy for every reader). Rank 0 only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TextIO

from stability.callbacks import Callback, Control, Flush, StepState
from stability.runfiles import RunFiles, append_jsonl, keep_lines, truncate_jsonl

events_log = logging.getLogger("stability.events")


class _Appender(Callback):
    """Appends rows to one JSON-lines file, cut back (``_cut``) where the run continues."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None

    def on_restore(self, state: StepState, reason: str) -> None:
        if self._file is not None:
            self._file.close()
        self._cut(state, reason)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def _cut(self, state: StepState, reason: str) -> None:
        truncate_jsonl(self.path, state.step)

    def _append(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            append_jsonl(self._file, rows)

    def on_close(self, state: StepState, summary: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class MetricsWriter(_Appender):
    """metrics.jsonl: every flushed row."""

    name = "metrics_file"

    def __init__(self, run_dir: Path) -> None:
        super().__init__(RunFiles(Path(run_dir)).metrics)

    def on_metrics(self, state: StepState, flush: Flush, control: Control) -> None:
        self._append(flush.rows)


class EventsWriter(_Appender):
    """events.jsonl: every detector event with its action, and one log line each (the
    ``stability.events`` logger: WARNING, ERROR for an error event)."""

    name = "events_file"
    restore_on_rollback = False  # a rollback keeps the record of why it happened

    def __init__(self, run_dir: Path, logger: logging.Logger = events_log) -> None:
        super().__init__(RunFiles(Path(run_dir)).events)
        self.logger = logger
        self.lines = 0
        """Lines written so far (a checkpoint keeps the count: a resume cuts back to it)."""

    def _cut(self, state: StepState, reason: str) -> None:
        if reason == "resume":
            keep_lines(self.path, self.lines)

    def on_metrics(self, state: StepState, flush: Flush, control: Control) -> None:
        self._append(flush.events)
        self.lines += len(flush.events)
        for e in flush.events:
            level = logging.ERROR if e["severity"] == "error" else logging.WARNING
            self.logger.log(level, "step %d %s: %s=%.4g (threshold %.4g) -> %s", e["step"],
                            e["detector"], e["metric"], e["value"], e["threshold"], e["action"])

    def state_dict(self) -> dict:
        return {"lines": self.lines}

    def load_state_dict(self, state: dict) -> None:
        self.lines = int(state["lines"])
