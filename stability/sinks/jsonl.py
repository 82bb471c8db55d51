"""metrics.jsonl and events.jsonl: one JSON object per line, appended as the run goes.

NaN and Infinity are written as Python's json writes them. On resume the files are cut back to
the checkpoint's step, so every step appears once however often the run was interrupted.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from stability.callbacks import Callback


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete rows of a JSON-lines file; a torn last line (a kill mid-write) is dropped."""
    rows = []
    if not path.exists():
        return rows
    with path.open() as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the rows with ``step <= max_step``, rewriting the file atomically."""
    if not path.exists():
        return
    rows = [row for row in read_jsonl(path) if row.get("step", 0) <= max_step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return value  # json writes NaN / Infinity tokens, as the contract says
    return value


class JsonlWriter(Callback):
    """Appends metric rows to metrics.jsonl (rank 0 only)."""

    name = "metrics_file"

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._file = None

    def on_restore(self, trainer, reason) -> None:
        if self._file is not None:
            self._file.close()
        truncate_jsonl(self.path, trainer.step)
        self._file = self.path.open("a")

    def on_metrics(self, trainer, rows) -> None:
        for row in rows:
            self._file.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._file.flush()

    def on_close(self, trainer, status) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
