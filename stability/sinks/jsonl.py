"""metrics.jsonl and events.jsonl: one JSON object per line, appended as the run goes.

NaN and Infinity are written as Python's json writes them. On a resume the files are cut back
to the checkpoint's step, so every step appears once however often the run was interrupted;
on a rollback metrics.jsonl is cut back too (the rolled-back steps are replaced), while
events.jsonl keeps the events that caused it. Reading, writing and cutting go through
``stability.runfiles`` (one torn-line policy for every reader). Rank 0 only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from stability.callbacks import Callback, Control, Flush, StepState
from stability.runfiles import RunFiles, append_jsonl, truncate_jsonl


class _Appender(Callback):
    """Appends rows to one JSON-lines file, cut back to the step a run continues from."""

    cut_on_rollback = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None

    def on_restore(self, state: StepState, reason: str) -> None:
        if reason == "resume" or self.cut_on_rollback:
            if self._file is not None:
                self._file.close()
                self._file = None
            truncate_jsonl(self.path, state.step)
        if self._file is None:
            self._file = self.path.open("a")

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
    """events.jsonl: every detector event with its action, and one line on stderr each."""

    name = "events_file"
    cut_on_rollback = False  # a rollback keeps the record of why it happened

    def __init__(self, run_dir: Path, stream: TextIO | None = None) -> None:
        super().__init__(RunFiles(Path(run_dir)).events)
        self.stream = stream

    def on_metrics(self, state: StepState, flush: Flush, control: Control) -> None:
        self._append(flush.events)
        stream = self.stream or sys.stderr
        for e in flush.events:
            print(f"[{e['severity']}] step {e['step']} {e['detector']}: {e['metric']}="
                  f"{e['value']:.4g} (threshold {e['threshold']:.4g}) -> {e['action']}",
                  file=stream, flush=True)
