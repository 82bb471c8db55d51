"""Detector benchmark: ``python -m benchmarks.detectors`` (or ``benchmarks/detectors/run.py``).

Scores every registered detector and the default set on trace families made by different
generators, and prints one table per family: precision, recall, recall within the latency
bar, mean/max detection latency (steps after onset; negative = before), false alarms (all,
and on clean traces), and microseconds per update; then, where a family has blow-ups, how
many were warned before their loss passed the loss at init, and each leading detector's lead.

Families: ``synthetic`` (:mod:`benchmarks.detectors.traces`, the detectors were tuned on it),
``synthetic-heldout`` (more seeds of that generator: an over-fitting check), ``published``
(:mod:`benchmarks.detectors.published`: another generator, shaped after published runs at
scale; held out), ``real`` (this project's own runs, ``real/heldout``; held out),
``real-dev`` (``real/dev``: looked at while the early-training rules were designed),
``real-heldout2`` (``real/heldout2``: the same configurations at a new seed, made after the
second revision; held out), ``real-studies`` and ``real-studies-heldout``
(``real/studies*``: the paper studies' own runs at seed 1, and at seeds 2-3; each was scored
once as held out, then looked at for a revision) and ``real-studies-heldout2`` (seeds 4-5,
labelled before the second revision; held out). The
exit status is 1 when a held-out family (``published``, ``real``, ``real-heldout2``,
``real-studies-heldout2``) misses the bar.
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
from benchmarks.detectors.published import PUBLISHED_SEED0, make_published_set  # noqa: E402
from benchmarks.detectors.real_studies import SPLITS  # noqa: E402
from benchmarks.detectors.traces import (  # noqa: E402
    HELDOUT_SEED0,
    REAL_DIR,
    TUNE_SEED0,
    load_real,
    make_set,
)
from stability.detectors import DEFAULT_DETECTORS, REGISTRY  # noqa: E402

BAR = {"precision": 0.97, "recall": 0.97, "spike_in_time": 0.90}
"""On every held-out family: precision, recall, and the share of spikes detected within
``LATENCY_BAR`` steps of onset; plus no false alarm on clean traces and every run of non-finite
values flagged on its first row."""
REAL_BAR = {"warned_share": 1.0, "lead_mean": 10.0}
"""On real runs, also: every blow-up (after learning) warned before its loss passes the loss at
init, with a mean lead of at least 10 steps, and no loss alarm on a calm run."""
FAMILIES = ("synthetic", "synthetic-heldout", "published", "real", "real-dev", "real-heldout2",
            "real-studies", "real-studies-heldout", "real-studies-heldout2")
HELDOUT = ("published", "real", "real-heldout2", "real-studies-heldout2")
REAL_SPLITS = {"real": "heldout", "real-dev": "dev", "real-heldout2": "heldout2"}
"""Family -> split of ``real/`` (``real_runs.SPLITS``)."""
"""Families the detectors were not tuned on: the exit status follows their bar."""

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
    for shape, c in d["crossings"].items():
        lines.append(
            f"{shape}: warned before the loss passed the loss at init {c['warned']}/{c['n']}; "
            f"lead mean {_fmt('{:.1f}', c['lead_mean'])}, median {_fmt('{}', c['lead_median'])}"
        )
    for name, ol in result["onset_leads"].items():
        if ol["n"]:
            lines.append(
                f"lead [{name}] on {ol['n']} blow-ups: fired {ol['fired']}, before the loss "
                f"moved {ol['ahead']}; steps before the loss moved: mean "
                f"{_fmt('{:.1f}', ol['lead_mean'])}, median {_fmt('{}', ol['lead_median'])}"
            )
    if result["calm_loss_alarms"]:
        lines.append(f"loss alarms on clean traces: {', '.join(result['calm_loss_alarms'][:10])}")
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


def meets_bar(result: dict[str, Any], real: bool = False) -> list[str]:
    """Failures of the default set against the acceptance bar (empty when it passes)."""
    d = result["sets"]["default"]
    spike_in_time = d["by_kind"].get("spike", {}).get("recall_in_time", math.nan)
    got = {"precision": d["precision"], "recall": d["recall"], "spike_in_time": spike_in_time}
    bad = [f"{k} {got[k]:.3f} < {v}" for k, v in BAR.items() if not got[k] >= v]
    if d["clean_false_alarms"]:
        bad.append(f"{d['clean_false_alarms']} false alarms on clean traces")
    if d["nonfinite_first_step"] != d["nonfinite_runs"]:
        bad.append("a non-finite run not flagged on its first row")
    if real:
        blow = d["crossings"].get("blow-up")
        if blow and blow["n"]:
            if blow["warned_share"] < REAL_BAR["warned_share"]:
                bad.append(f"blow-ups warned before passing the loss at init "
                           f"{blow['warned']}/{blow['n']}")
            if not blow["lead_mean"] >= REAL_BAR["lead_mean"]:
                bad.append(f"mean lead {blow['lead_mean']:.1f} < {REAL_BAR['lead_mean']} steps")
        if result["calm_loss_alarms"]:
            bad.append(f"{len(result['calm_loss_alarms'])} loss alarms on calm runs")
    return bad


def family_traces(family: str, n_clean: int, n_spike: int) -> list[Any]:
    """The traces of one family (the real ones from ``real/``; none when absent)."""
    if family == "synthetic":
        return make_set(TUNE_SEED0, n_clean, n_spike)
    if family == "synthetic-heldout":
        return make_set(HELDOUT_SEED0, n_clean, n_spike)
    if family == "published":
        return make_published_set(n_clean, n_spike, PUBLISHED_SEED0)
    if family in REAL_SPLITS:
        return load_real(REAL_DIR, REAL_SPLITS[family])
    if family.startswith("real-studies"):
        split = family.removeprefix("real-")
        return load_real(SPLITS[split][0], split)
    raise ValueError(f"family={family!r} is not allowed: one of {', '.join(FAMILIES)}")


def run(
    n_clean: int,
    n_spike: int,
    which: list[str],
    names: list[str] | None = None,
    params: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate on the requested families (see :data:`FAMILIES`)."""
    names = names or list(REGISTRY)
    sets = {"default": DEFAULT_DETECTORS}
    out = {}
    for w in which:
        traces = family_traces(w, n_clean, n_spike)
        if not traces:
            continue
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
        default=list(FAMILIES),
        choices=FAMILIES,
        help="trace families to evaluate",
    )
    p.add_argument("--n-clean", type=int, default=200, help="clean traces per synthetic family")
    p.add_argument("--n-spike", type=int, default=300, help="spike traces per synthetic family")
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
        kind = "held out" if w in HELDOUT else "tuning" if w == "synthetic" else "not held out"
        size = (f"{a.n_clean} clean + {a.n_spike} spike" if not w.startswith("real")
                else f"{sum(t == 'clean' for t in res['families'])} calm")
        title = f"== {w} ({kind}): {res['traces']} traces ({size})"
        print(format_table(title + f"; in time = within {LATENCY_BAR} steps of onset", res))
        bad = meets_bar(res, real=w.startswith("real"))
        print("default set meets the bar" if not bad else "default set misses the bar: "
              + "; ".join(bad))
        print()
        ok = ok and (not bad or w not in HELDOUT)
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
