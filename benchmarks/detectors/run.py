"""Detector benchmark: ``python -m benchmarks.detectors`` (or ``benchmarks/detectors/run.py``).

Generates the tuning and held-out trace sets (and loads labelled real traces, if any), runs
every registered detector and the default set, and prints one table per set: precision,
recall, recall within the latency bar, mean/max detection latency (steps after onset;
negative = before), false alarms (all, and on clean traces), and microseconds per update.
``--csv``/``--json`` write the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.detectors.evaluate import LATENCY_BAR, evaluate  # noqa: E402
from benchmarks.detectors.traces import (  # noqa: E402
    HELDOUT_SEED0,
    HELDOUT_V1_SEED0,
    REAL_DIR,
    TUNE_SEED0,
    load_real,
    make_set,
)
from stability.detectors import DEFAULT_DETECTORS, REGISTRY  # noqa: E402

BAR = {"precision": 0.97, "recall_in_time": 0.97}
SEED0 = {"tune": TUNE_SEED0, "heldout": HELDOUT_SEED0, "heldout_v1": HELDOUT_V1_SEED0}
"""Trace sets by name: tuning seeds, held-out seeds, and the first (spent) held-out seeds."""

COLUMNS = [
    ("detector", "{}"),
    ("precision", "{:.3f}"),
    ("recall", "{:.3f}"),
    ("recall_in_time", "{:.3f}"),
    ("spike_in_time", "{:.3f}"),
    ("nonfinite_in_time", "{:.3f}"),
    ("latency_mean", "{:.2f}"),
    ("latency_max", "{}"),
    ("false_alarms", "{}"),
    ("clean_false_alarms", "{}"),
    ("clean_traces_alarmed", "{}"),
    ("cost_us", "{:.1f}"),
]


def _fmt(fmt: str, v: Any) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return fmt.format(v)


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per detector and per set."""
    rows = []
    for kind in ("sets", "detectors"):
        for name, s in result[kind].items():
            row = {"detector": f"[{name}]" if kind == "sets" else name, **s}
            for k in ("spike", "nonfinite"):
                row[f"{k}_in_time"] = s["by_kind"].get(k, {}).get("recall_in_time", math.nan)
            row["cost_us"] = (
                result["cost_us"].get(name, math.nan)
                if kind == "detectors"
                else sum(result["cost_us"][m] for m in result["set_members"][name])
            )
            rows.append(row)
    return rows


def format_table(title: str, result: dict[str, Any]) -> str:
    """The printed table for one trace set."""
    rows = table_rows(result)
    head = [c for c, _ in COLUMNS]
    cells = [[_fmt(f, r.get(c, math.nan)) for c, f in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    d = result["sets"]["default"]
    lines.append(
        f"default set: non-finite runs flagged on their first bad row: "
        f"{d['nonfinite_first_step']}/{d['nonfinite_runs']}; recall by shape (in time): "
        + ", ".join(f"{k} {v['recall_in_time']:.2f} (n={v['n']})" for k, v in d["by_shape"].items())
    )
    for name, ld in result["lead"].items():
        if not ld["incidents"]:
            continue
        lv, lo = ld["lead_vs_loss_steps"], ld["lead_vs_onset_steps"]
        lines.append(
            f"lead [{name}] on {ld['incidents']} precursor incidents: fired "
            f"{ld['leading_fired']:.2f}, before loss_spike {ld['before_loss']:.2f}, before onset "
            f"{ld['before_onset']:.2f}; steps ahead of loss_spike: mean "
            f"{_fmt('{:.1f}', lv['mean'])}, median {_fmt('{}', lv['median'])}, min "
            f"{_fmt('{}', lv['min'])}, max {_fmt('{}', lv['max'])}; ahead of onset: mean "
            f"{_fmt('{:.1f}', lo['mean'])}"
        )
    return "\n".join(lines)


def meets_bar(result: dict[str, Any]) -> list[str]:
    """Failures of the default set against the acceptance bar (empty when it passes)."""
    d = result["sets"]["default"]
    bad = [f"{k} {d[k]:.3f} < {v}" for k, v in BAR.items() if not d[k] >= v]
    if d["clean_false_alarms"]:
        bad.append(f"{d['clean_false_alarms']} false alarms on clean traces")
    if d["nonfinite_first_step"] != d["nonfinite_runs"]:
        bad.append("a non-finite run not flagged on its first row")
    return bad


def run(
    n_clean: int,
    n_spike: int,
    which: list[str],
    names: list[str] | None = None,
    params: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate on the requested sets (``tune``, ``heldout``, ``real``)."""
    names = names or list(REGISTRY)
    sets = {"default": DEFAULT_DETECTORS}
    out = {}
    for w in which:
        if w == "real":
            traces = load_real(REAL_DIR)
            if not traces:
                continue
        else:
            traces = make_set(SEED0[w], n_clean, n_spike)
        res = evaluate(traces, names, params, sets)
        res["set_members"] = sets
        out[w] = res
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.detectors", description=__doc__)
    p.add_argument(
        "--sets",
        nargs="+",
        default=["tune", "heldout", "real"],
        choices=list(SEED0) + ["real"],
        help="trace sets to evaluate",
    )
    p.add_argument("--n-clean", type=int, default=200, help="clean traces per set")
    p.add_argument("--n-spike", type=int, default=300, help="spike traces per set")
    p.add_argument(
        "--detector",
        nargs="+",
        action="extend",
        default=None,
        help="detectors to score (default: all registered)",
    )
    p.add_argument(
        "--params",
        type=json.loads,
        default=None,
        help='JSON parameters per detector, e.g. {"loss_spike": {"k_large": 7}}',
    )
    p.add_argument("--csv", type=Path, help="write the table rows here")
    p.add_argument("--json", type=Path, help="write every number here")
    a = p.parse_args(argv)
    names = a.detector
    if names:
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            p.error(
                f"--detector {unknown[0]!r} is not allowed: one of {', '.join(sorted(REGISTRY))}"
            )
        names = list(dict.fromkeys([*names, *DEFAULT_DETECTORS]))
    t0 = time.perf_counter()
    results = run(a.n_clean, a.n_spike, a.sets, names, a.params)
    ok = True
    for w, res in results.items():
        title = (
            f"== {w} set: {res['traces']} traces ({a.n_clean} clean + {a.n_spike} spike)"
            if w != "real"
            else f"== real: {res['traces']} traces"
        )
        print(format_table(title + f"; in time = within {LATENCY_BAR} steps of onset", res))
        bad = meets_bar(res)
        print("default set meets the bar" if not bad else "default set FAILS: " + "; ".join(bad))
        print()
        ok = ok and not bad
    print(f"({time.perf_counter() - t0:.0f} s)")
    if a.csv:
        with a.csv.open("w", newline="") as f:
            fields = ["set", *(c for c, _ in COLUMNS), "latency_median", "duplicates"]
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for name, res in results.items():
                for row in table_rows(res):
                    w.writerow({"set": name, **row})
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
