"""The run directory's files: their names, one reader, atomic writes, and the lock.

Every piece of the project that reads or writes a run's files goes through here: the trainer,
its sinks and checkpoints, ``stability.detect`` and ``analysis``. No torch: analysis and the
detectors import it.

Layout of a run directory (see README "Outputs")::

    config.yaml                  the resolved config the run uses now
    config.resume-<step>.yaml    the config it used before a resume that changed keys
    metrics.jsonl                one JSON object per logged step
    events.jsonl                 one JSON object per detector event
    summary.json                 how the run ended (written at the end, atomically)
    run.lock                     held by the process that trains in the directory
    wandb_run.json               the W&B run's id, name, group, job type (fixed at its start)
    checkpoints/step_<step>/     see stability.checkpoint

JSON lines: NaN and Infinity are written as Python's json writes them. One policy for a line
that does not parse, for every reader: the *last* line may be torn (a process killed while
writing it) and is dropped quietly; a bad line anywhere else is reported with its file and line
number and skipped, and every row after it is kept.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
SUMMARY = "summary.json"
LOCK = "run.lock"
WANDB_RUN = "wandb_run.json"
CHECKPOINTS = "checkpoints"

FINISHED = ("completed", "diverged", "stopped")
"""Statuses of a run that ended by itself (a result); preempted and crashed runs resume."""


@dataclass(frozen=True)
class RunFiles:
    """The paths of one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def events(self) -> Path:
        return self.root / EVENTS

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def wandb_run(self) -> Path:
        return self.root / WANDB_RUN

    def config_before_resume(self, step: int) -> Path:
        """Where config.yaml goes when a resume at ``step`` changes the config."""
        return self.root / f"config.resume-{step:08d}.yaml"

    def read_summary(self) -> dict[str, Any] | None:
        """summary.json, or None when there is none (or it cannot be read)."""
        try:
            summary = json.loads(self.summary.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return summary if isinstance(summary, dict) else None

    def holds_a_run(self) -> bool:
        """Has a run written here (rows, a summary or a checkpoint)?"""
        if self.summary.exists() or (self.metrics.exists() and self.metrics.stat().st_size):
            return True
        return self.checkpoints.is_dir() and any(self.checkpoints.iterdir())


# ---------------------------------------------------------------------- JSON lines
def iter_jsonl(path: Path | str) -> Iterator[dict[str, Any]]:
    """The rows of a JSON-lines file in order; a missing file has none (policy: module doc)."""
    path = Path(path)
    try:
        f = path.open()
    except FileNotFoundError:
        return
    with f:
        pending: tuple[int, str] | None = None
        for number, line in enumerate(f, 1):
            if pending is not None:
                row = _parse(path, *pending)
                if row is not None:
                    yield row
            pending = (number, line) if line.strip() else None
        if pending is not None:
            row = _parse(path, *pending, last=True)
            if row is not None:
                yield row


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """All rows of a JSON-lines file (see :func:`iter_jsonl`; the same rows, faster)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    try:  # one parse for the whole file is several times faster than one per line
        rows = json.loads("[" + ",".join(line for line in text.splitlines() if line.strip())
                          + "]")
    except json.JSONDecodeError:
        return list(iter_jsonl(path))  # a torn or bad line: the line-by-line policy
    if all(isinstance(row, dict) for row in rows):
        return rows
    return list(iter_jsonl(path))


def _parse(path: Path, number: int, line: str, last: bool = False) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        if not last:
            log.warning("%s:%d: skipping a line that is not JSON (%s)", path, number, error)
        return None
    if not isinstance(row, dict):
        log.warning("%s:%d: skipping a line that is not a JSON object", path, number)
        return None
    return row


def append_jsonl(f, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows to an open file, one JSON object a line, and flush."""
    for row in rows:
        f.write(json.dumps(row) + "\n")
    f.flush()


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the rows with ``step <= max_step`` (atomically). A torn last line goes; a bad line
    elsewhere is kept as it is (it is evidence, and nothing after it is lost)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                kept.append(line)
            continue
        if not isinstance(row, dict) or row.get("step", 0) <= max_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, "".join(kept))


def keep_lines(path: Path, count: int) -> None:
    """Keep the first ``count`` lines of a file, whatever they hold (atomically)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) > count:
        write_atomic(path, "".join(lines[:count]))


# ---------------------------------------------------------------------- durable writes
def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where directories can't be
    opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path``: a temporary file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, atomically (see :func:`write_atomic`)."""
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


# ---------------------------------------------------------------------- the lock
class RunLocked(RuntimeError):
    """Another process trains in this run directory."""


class RunLock:
    """An exclusive ``flock`` on ``run.lock``, held while a process trains in the directory.

    The file keeps the holder's pid and host, so a second process can say who holds it. The
    operating system releases the lock when the holder exits, however it exits (kill -9
    included), so a stale lock file never blocks a requeued job. (On network file systems
    without flock support, locking is skipped with a warning.)
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"run directory {self.path.parent} is in use by {holder}") from None
        except OSError as error:  # no flock on this file system
            log.warning("cannot lock %s (%s); not guarding against a second process",
                        self.path, error)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
