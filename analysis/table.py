"""One row per run of a sweep: ``python -m analysis.table SWEEP_DIR [--csv OUT] [--metric KEY]``.

Columns: run, overrides (those not shared by every run; the shared ones are printed above the
table), status, steps, final loss, spikes (incidents in ``events.jsonl``), then one column per
``--metric``. Rows are sorted by overrides, numbers compared as numbers. ``--csv`` also writes
the table (full overrides, full precision, plus ``run_dir``) as CSV.

``--metric KEY[:AGG]`` looks KEY up in the runs table (``optim.lr``, ``best_loss``,
``summary.num_spikes``, ...), then in the per-run spike metrics (``spike_score_loss``,
``loss_spikes``, ``recover_steps_mean``, ...), then in ``metrics.jsonl`` keys, reduced over the
run by AGG: ``last`` (default, last logged non-NaN value), ``max``, ``min`` or ``mean``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis.metrics import run_metrics
from analysis.runs import RunData, load_runs, natural_key

AGGREGATES = ("last", "max", "min", "mean")
_BASE = ["run_id", "overrides", "status", "steps", "final_loss", "num_spikes"]
_HEADERS = {"run_id": "run", "num_spikes": "spikes"}


def _value_key(value: str) -> tuple:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def overrides_key(overrides: str) -> tuple:
    """Sort key of an overrides string: per ``key=value`` token, values compared as numbers."""
    out = []
    for token in overrides.split():
        key, _, value = token.partition("=")
        out.append((key, _value_key(value)))
    return tuple(out)


def _metric_column(data: RunData, spec: str, spikes: pd.DataFrame | None) -> pd.Series:
    key, _, agg = spec.partition(":")
    agg = agg or "last"
    if agg not in AGGREGATES:
        raise ValueError(f"--metric {spec}: aggregate must be one of {', '.join(AGGREGATES)}")
    if key in data.runs.columns:
        return data.runs.set_index("run_id")[key]
    if spikes is not None and key in spikes.columns:
        return spikes.set_index("run_id")[key]
    if key in data.metrics.columns:
        logged = data.metrics[["run_id", key]].dropna()
        return logged.groupby("run_id", sort=False)[key].agg(agg)
    raise ValueError(f"--metric {spec}: no such key in the runs' config, summary or metrics")


def build_table(data: RunData, metrics: Sequence[str] = ()) -> pd.DataFrame:
    """The table: base columns plus one per metric spec, sorted by overrides then run."""
    table = data.runs[_BASE].copy()
    with contextlib.suppress(TypeError, ValueError):  # non-integral steps stay as they are
        table["steps"] = table["steps"].astype("Int64")
    keys = [spec.partition(":")[0] for spec in metrics]
    spikes = run_metrics(data) if any(k not in data.runs.columns for k in keys) else None
    for spec in metrics:
        table[spec] = table["run_id"].map(_metric_column(data, spec, spikes))
    order = sorted(
        range(len(table)),
        key=lambda i: (
            overrides_key(table["overrides"].iat[i]),
            natural_key(table["run_id"].iat[i]),
        ),
    )
    table["run_dir"] = data.runs["run_dir"]
    return table.iloc[order].reset_index(drop=True)


def _fmt(value: object, spec: str = ".4f") -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _cells(column: pd.Series) -> list[str]:
    """Format a column: floats with 4 decimals, or 4 significant digits where values are tiny
    or huge (learning rates), one format per column so decimals line up."""
    spec = ".4f"
    if pd.api.types.is_float_dtype(column):
        size = column[column.abs() < math.inf].abs()
        if ((size > 0) & ((size < 0.01) | (size >= 1e5))).any():
            spec = ".4g"
    return [_fmt(v, spec) for v in column.tolist()]


def render(table: pd.DataFrame) -> str:
    """Aligned text: shared overrides on a comment line, then header and one line per run."""
    tokens = [set(o.split()) for o in table["overrides"]]
    common = set.intersection(*tokens) if len(tokens) > 1 else set()
    first = table["overrides"].iat[0].split() if len(table) else []
    lines = [f"# common overrides: {' '.join(t for t in first if t in common)}"] if common else []
    shown = table.drop(columns=["run_dir"], errors="ignore")
    shown["overrides"] = [
        " ".join(t for t in o.split() if t not in common) for o in shown["overrides"]
    ]
    columns = [_cells(shown[c]) for c in shown.columns]
    header = [_HEADERS.get(c, c) for c in shown.columns]
    numeric = [pd.api.types.is_numeric_dtype(shown[c]) for c in shown.columns]
    widths = [max(len(h), *map(len, cells)) for h, cells in zip(header, columns, strict=True)]
    for row in [header, *zip(*columns, strict=True)]:
        cols = zip(row, widths, numeric, strict=True)
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in cols]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a missing or empty sweep directory)."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.table", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("sweep_dir", type=Path, help="run, sweep or any directory of runs")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV to this path")
    parser.add_argument(
        "--metric", action="append", default=[], metavar="KEY[:AGG]", help="extra column"
    )
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"analysis.table: error: no such directory: {args.sweep_dir}", file=sys.stderr)
        return 2
    data = load_runs(args.sweep_dir)
    if not len(data):
        print(
            f"analysis.table: error: no runs (config.yaml + metrics.jsonl) under {args.sweep_dir}",
            file=sys.stderr,
        )
        return 2
    try:
        table = build_table(data, args.metric)
    except ValueError as err:
        print(f"analysis.table: error: {err}", file=sys.stderr)
        return 2
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)
    try:
        print(render(table), flush=True)
    except BrokenPipeError:  # piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
