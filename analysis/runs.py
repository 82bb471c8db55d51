"""Find run directories and load them into tidy pandas tables.

A run directory holds ``config.yaml`` and ``metrics.jsonl`` (required), and optionally
``events.jsonl``, ``summary.json`` and ``.hydra/overrides.yaml``. A run without
``summary.json`` (crashed or still running) gets the status ``"incomplete"``. A truncated last
line of a JSON-lines file (a killed run) is dropped.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import multiprocessing as mp
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from analysis import metrics as M
from stability.runfiles import read_jsonl

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_SKIP_DIRS = {"wandb", "checkpoints", "__pycache__", ".hydra", ".git"}

EVENT_COLUMNS = [
    "run_id", "step", "detector", "metric", "value", "threshold", "score", "severity", "kind",
    "action",
]  # fmt: skip
RUN_COLUMNS = [
    "run_id", "run_dir", "overrides", "status", "steps", "num_logged", "last_step",
    "loss_at_init", "best_loss", "final_loss", "eval_loss", "unigram", "bigram", "peak_loss",
    "nonfinite", "diverged", "num_events", "num_spikes", "num_loss_spikes", "num_grad_spikes",
    "num_leading", "num_nonfinite", "spike_rate",
]  # fmt: skip


@dataclass
class RunData:
    """Tidy tables of a set of runs, joined on ``run_id``.

    Attributes:
        runs: One row per run: ``RUN_COLUMNS``, then ``summary.<key>`` for each key of
            ``summary.json``, then the flattened config with dotted keys (``optim.lr``).
            ``eval_loss`` is the held-out loss at the end (summary.json, else the last logged
            one; NaN without evaluation); ``unigram``/``bigram`` the corpus's n-gram levels
            for the run's tokenizer (``analysis.corpus``; NaN for data other than the sample
            corpus); ``diverged`` is :func:`analysis.metrics.is_diverged`; the
            ``num_*`` columns count detector incidents by kind (``M.INCIDENT_KINDS``).
        metrics: One row per logged record (wide): ``run_id``, ``step`` and every key logged
            in ``metrics.jsonl`` (NaN where a run did not log that key).
        events: One row per detector event: ``EVENT_COLUMNS`` and any extra fields.
    """

    runs: pd.DataFrame
    metrics: pd.DataFrame
    events: pd.DataFrame

    def __len__(self) -> int:
        return len(self.runs)


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded numbers numerically (``2`` before ``10``)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Run directories under ``root`` (itself included), in natural path order.

    A run directory is any directory holding both ``config.yaml`` and ``metrics.jsonl``. The
    search does not descend into a run directory, nor into ``wandb/``, ``checkpoints/`` or
    hidden directories.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "config.yaml" in filenames and "metrics.jsonl" in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
    return sorted(found, key=lambda p: natural_key(p.as_posix()))


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=_Loader)
    except FileNotFoundError:
        return None


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        warnings.warn(f"{path}: unreadable, treating the run as incomplete", stacklevel=2)
        return None
    return summary if isinstance(summary, dict) else None


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config to dotted keys (``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``).

    Lists become tuples so that every value can be grouped on.
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = _freeze(value)
    return out


def _dedupe_steps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the last record of each step, in step order (a resumed or rolled-back run re-logs)."""
    steps = [r.get("step") for r in records]
    if all(a is not None and b is not None and a < b for a, b in itertools.pairwise(steps)):
        return records
    last = {r.get("step", i): r for i, r in enumerate(records)}
    return [last[s] for s in sorted(last, key=lambda s: (s is None, s))]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _run_row(
    run_id: str,
    run_dir: str,
    config: Mapping[str, Any],
    overrides: Iterable[str],
    summary: Mapping[str, Any] | None,
    metrics: pd.DataFrame,
    events: list[dict[str, Any]],
    *,
    vocab_size: int | None,
    final_k: int,
    merge_gap: int,
) -> dict[str, Any]:
    """One row of the runs table (shared by the directory and the W&B loaders)."""
    loss = metrics["loss"].to_numpy(dtype=float) if "loss" in metrics else np.array([])
    summary = summary or {}
    init = summary.get("loss_at_init")
    if vocab_size is not None or not _is_number(init) or not math.isfinite(init):
        init = M.loss_at_init(loss, vocab_size=vocab_size)
    final = M.final_loss(loss, final_k)
    last_step = metrics["step"].iat[-1] if len(metrics) and "step" in metrics else None
    last_step = last_step.item() if isinstance(last_step, np.generic) else last_step
    steps = summary.get("steps")
    steps = last_step if steps is None else steps
    row_status = summary.get("status", "incomplete") if summary else "incomplete"
    num_spikes = len(M.merge_incidents((e["step"] for e in events if "step" in e), merge_gap))
    evals = metrics["eval_loss"].dropna() if "eval_loss" in metrics else pd.Series(dtype=float)
    eval_loss = summary.get("eval_loss")
    if not _is_number(eval_loss) or not math.isfinite(eval_loss):
        eval_loss = float(evals.iloc[-1]) if len(evals) else math.nan
    levels = M.corpus_levels(config.get("data", {}))
    nonfinite = bool(len(loss)) and not bool(np.isfinite(loss).all())
    row: dict[str, Any] = {
        "run_id": run_id,
        "run_dir": run_dir,
        "overrides": " ".join(str(o) for o in overrides),
        "status": row_status,
        "steps": steps,
        "num_logged": len(metrics),
        "last_step": last_step,
        "loss_at_init": init,
        "best_loss": M.best_loss(loss),
        "final_loss": final,
        "eval_loss": eval_loss,
        "unigram": levels[0],
        "bigram": levels[1],
        "peak_loss": float(np.nanmax(np.where(np.isfinite(loss), loss, np.nan)))
        if np.isfinite(loss).any() else math.nan,
        "nonfinite": nonfinite,
        "diverged": row_status == "diverged" or M.is_diverged(
            loss, init=init, k=final_k, eval_loss=eval_loss, unigram=levels[0]),
        "num_events": len(events),
        "num_spikes": num_spikes,
        **M.incidents_by_kind(events, merge_gap),
        "spike_rate": M.spike_rate(num_spikes, steps) if _is_number(steps) else math.nan,
    }
    row.update(flatten(summary, "summary."))
    for key, value in flatten({k: v for k, v in config.items() if k != "hydra"}).items():
        row[f"config.{key}" if key in row else key] = value
    return row


def _records_frame(records: list[dict[str, Any]], run_id: str) -> pd.DataFrame:
    """A run's records as a frame, built column by column when every record has the same keys
    (several times faster than from a list of dicts)."""
    if not records:
        return pd.DataFrame({"run_id": pd.Series(dtype=object)})
    keys = list(records[0])
    try:  # same key count and no KeyError: every record has the same keys
        if any(len(r) != len(keys) for r in records):
            raise KeyError
        frame = pd.DataFrame(list(map(itemgetter(*keys), records)), columns=keys)
    except KeyError:  # some keys are logged only every few steps
        frame = pd.DataFrame.from_records(records)
    frame.insert(0, "run_id", run_id)
    return frame


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: parsing makes many small objects and no cycles, and
    collections over the growing heap otherwise double the loading time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_run(
    run_dir: Path, run_id: str, **opts: Any
) -> tuple[dict[str, Any], pd.DataFrame, list[dict[str, Any]]]:
    config = _read_yaml(run_dir / "config.yaml") or {}
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml") or []
    summary = _read_summary(run_dir / "summary.json")
    records = _dedupe_steps(read_jsonl(run_dir / "metrics.jsonl"))
    events = read_jsonl(run_dir / "events.jsonl")
    for e in events:
        e["run_id"] = run_id
    frame = _records_frame(records, run_id)
    row = _run_row(run_id, str(run_dir), config, overrides, summary, frame, events, **opts)
    return row, frame, events


def _tables(
    rows: list[dict[str, Any]], frames: list[pd.DataFrame], events: list[dict[str, Any]]
) -> RunData:
    runs = pd.DataFrame(rows)
    runs = runs.reindex(columns=list(dict.fromkeys([*RUN_COLUMNS, *runs.columns])))
    metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    metrics = metrics.reindex(columns=list(dict.fromkeys(["run_id", "step", *metrics.columns])))
    ev = pd.DataFrame.from_records(events) if events else pd.DataFrame()
    ev = ev.reindex(columns=list(dict.fromkeys([*EVENT_COLUMNS, *ev.columns])))
    return RunData(runs=runs, metrics=metrics, events=ev)


def load_runs(
    root: str | os.PathLike,
    *,
    vocab_size: int | None = None,
    final_k: int = M.FINAL_K,
    merge_gap: int = M.MERGE_GAP,
    jobs: int = 1,
) -> RunData:
    """Load every run directory under ``root`` (see :func:`find_runs`).

    Args:
        root: A run directory, a sweep directory or any tree of them.
        vocab_size: If given, the loss at init is ``ln(vocab_size)`` for every run; else the
            run's ``summary.json`` ``loss_at_init``, else its first finite logged loss.
        final_k: Logged records averaged into ``final_loss`` (:func:`metrics.final_loss`).
        merge_gap: Steps that separate two spike incidents in ``num_spikes``.
        jobs: Processes that parse the files (:func:`read_runs`).

    Returns:
        The tables; ``run_id`` is the run's path relative to ``root`` (its name if it is root).
        Each run's metrics keep the last record of each step, in step order.
    """
    root = Path(root)
    return read_runs(root, [d.relative_to(root).as_posix() for d in find_runs(root)],
                     vocab_size=vocab_size, final_k=final_k, merge_gap=merge_gap, jobs=jobs)


def read_runs(root: str | os.PathLike, dirs: Iterable[str], *, jobs: int = 1,
              **opts: Any) -> RunData:
    """Load the run directories ``dirs`` (paths relative to ``root``; those without
    ``config.yaml`` and ``metrics.jsonl`` are left out) in the order given; ``run_id`` is the
    relative path (the name of ``root`` for ``.``). ``opts``: those of :func:`load_runs`.

    Parsing the JSON lines is most of the time, so ``jobs`` forked processes (where the platform
    forks) each parse a share of the directories.
    """
    root, dirs = Path(root), list(dirs)
    opts = {"vocab_size": None, "final_k": M.FINAL_K, "merge_gap": M.MERGE_GAP, **opts}
    jobs = max(1, min(jobs, len(dirs) // 8))  # forking costs more than parsing a few runs
    if jobs == 1 or "fork" not in mp.get_all_start_methods():
        return _tables(*_read_dirs(root, dirs, opts))
    chunks = [dirs[i * len(dirs) // jobs:(i + 1) * len(dirs) // jobs] for i in range(jobs)]
    with mp.get_context("fork").Pool(jobs) as pool:
        parts = pool.starmap(_read_dirs, [(root, chunk, opts) for chunk in chunks])
    return _tables(*([x for part in parts for x in part[k]] for k in range(3)))


def _read_dirs(root: Path, dirs: list[str], opts: dict[str, Any]) -> tuple[list, list, list]:
    """(rows, metric frames, events) of the run directories (relative to root) that exist."""
    rows, frames, events = [], [], []
    with _gc_paused():
        for rel in dirs:
            run_dir = root / rel
            if not ((run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()):
                continue
            row, frame, evs = _read_run(run_dir, run_dir.name if rel == "." else rel, **opts)
            rows.append(row)
            frames.append(frame)
            events.extend(evs)
    return rows, frames, events


def load_run(run_dir: str | os.PathLike, **kwargs: Any) -> RunData:
    """Load one run directory (same tables as :func:`load_runs`, one run)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (config.yaml + metrics.jsonl)")
    return load_runs(run_dir, **kwargs)


_WANDB_STATES = {"finished": "completed", "running": "running"}


def load_wandb_project(
    entity: str,
    project: str,
    *,
    filters: dict[str, Any] | None = None,
    prefix: str = "train/",
    vocab_size: int | None = None,
    final_k: int = M.FINAL_K,
) -> RunData:
    """Load a W&B project's runs into the same tables (needs the network and an API key).

    Metric keys lose ``prefix`` (``train/loss`` -> ``loss``) and ``_step`` stands in for a
    missing ``step``. W&B holds no ``events.jsonl``: the events table is empty and the spike
    counts are 0. ``run_id`` is the W&B run id; ``run_dir`` its URL.

    Args:
        entity: W&B entity (user or team).
        project: W&B project.
        filters: MongoDB-style filters passed to ``wandb.Api().runs``.
        prefix: Prefix stripped from metric keys.
        vocab_size: See :func:`load_runs`.
        final_k: See :func:`load_runs`.
    """
    import wandb  # lazily: only this loader needs it, and only online

    rows, frames = [], []
    for run in wandb.Api().runs(f"{entity}/{project}", filters=filters):
        config = {
            k: v["value"] if isinstance(v, dict) and set(v) <= {"value", "desc"} else v
            for k, v in run.config.items()
            if not k.startswith("_")
        }
        summary = {k: v for k, v in run.summary_metrics.items() if not k.startswith("_")}
        summary.setdefault("status", _WANDB_STATES.get(run.state, "incomplete"))
        recs = []
        for h in run.scan_history():
            r = {k.removeprefix(prefix): v for k, v in h.items() if not k.startswith("_")}
            r.setdefault("step", h.get("_step"))
            recs.append(r)
        frame = _records_frame(_dedupe_steps(recs), run.id)
        opts = {"vocab_size": vocab_size, "final_k": final_k, "merge_gap": M.MERGE_GAP}
        rows.append(_run_row(run.id, run.url, config, [], summary, frame, [], **opts))
        frames.append(frame)
    return _tables(rows, frames, [])
