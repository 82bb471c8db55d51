"""Scoring detectors on labelled traces: precision, recall, latency, false alarms, lead time."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.detectors.traces import Incident, Trace
from stability.detectors import DEFAULT_DETECTORS, REGISTRY, Event, build_detectors

LATENCY_BAR = 2
"""A spike counts as caught in time if detected at most this many steps after its onset
(non-finite incidents: at or before the first bad step)."""

LOSS_DETECTOR = "loss_spike"
LEADING_METRIC = {
    "attn_logit_growth": "attn_logit_max",
    "logsumexp_drift": "logsumexp_mean",
    "update_ratio_growth": "update_ratio_max",
}
"""Leading detectors and the statistic each watches (lead time is measured on the incidents
whose precursor grows that statistic)."""
LEADING_DETECTORS = tuple(LEADING_METRIC)


def run_trace(
    trace: Trace, names: Sequence[str], params: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[dict[str, list[Event]], dict[str, float]]:
    """Run each detector on the trace; its events and its CPU time per update (microseconds)."""
    dets = build_detectors(names, params)
    events: dict[str, list[Event]] = {}
    cost: dict[str, float] = {}
    for d in dets:
        out: list[Event] = []
        t0 = time.process_time()  # CPU time: other processes on the machine do not count
        for row in trace.rows:
            out.extend(d.update(row["step"], row))
        cost[d.name] = (time.process_time() - t0) / max(1, len(trace.rows)) * 1e6
        events[d.name] = out
    return events, cost


def oracle_events(trace: Trace, single: float = 6.5, sustained: float = 3.25) -> list[Event]:
    """A label-level rule applied with the true clean trend and noise (which no detector sees).

    Fires on a row ``single`` noise sigmas above the clean trend (log units), or when the
    median of the last three rows is ``sustained`` sigmas above it (all three at least 2.5);
    one event per incident, re-armed after three rows back under 2 sigmas. The levels sit
    between the labels' benign and spike levels, so it measures how separable the trace set
    is: the ceiling for a detector whose only error is the noise, not its trend estimate.
    """
    if trace.trend is None or trace.noise is None:
        return []
    out: list[Event] = []
    last: list[float] = []
    active, quiet = False, 0
    for row, clean, s in zip(trace.rows, trace.trend, trace.noise, strict=True):
        v = row.get("loss")
        if not isinstance(v, float) or not math.isfinite(v) or v <= 0:
            continue
        z = math.log(v / clean) / s
        if active:
            quiet = quiet + 1 if z < 2.0 else 0
            if quiet >= 3:
                active, last = False, []
            continue
        last = [*last[-2:], z]
        fire = z >= single or (
            len(last) == 3 and sorted(last)[1] >= sustained and min(last) >= 2.5
        )
        if fire:
            active, quiet = True, 0
            out.append(Event(row["step"], "(oracle)", "loss", v, clean, z, "warn", "spike"))
    return out


def _incident_of(step: int, incidents: Sequence[Incident]) -> int | None:
    for i, inc in enumerate(incidents):
        if inc.start <= step <= inc.end:
            return i
    return None


def in_time(inc: Incident, latency: float) -> bool:
    """Whether a detection with this latency meets the bar for the incident's kind."""
    return latency <= (0 if inc.kind == "nonfinite" else LATENCY_BAR)


@dataclass
class Score:
    """Counts for one detector (or set) over a trace set."""

    incidents: int = 0
    detected: int = 0
    in_time: int = 0
    false_alarms: int = 0
    clean_traces: int = 0
    clean_traces_alarmed: int = 0
    clean_false_alarms: int = 0
    duplicates: int = 0
    latencies: list[int] = field(default_factory=list)
    by_kind: dict[str, list[int]] = field(default_factory=dict)
    by_shape: dict[str, list[int]] = field(default_factory=dict)
    missed: list[str] = field(default_factory=list)
    false: list[str] = field(default_factory=list)
    nonfinite_runs: int = 0
    nonfinite_first_step: int = 0
    crossings: dict[str, list[int | None]] = field(default_factory=dict)
    """Per shape, for incidents with a ``cross`` step: its lead (cross minus the first event in
    the window; None when nothing fired in the window)."""

    def add(self, trace: Trace, events: Sequence[Event]) -> None:
        incs = trace.incidents
        first: dict[int, int] = {}
        n_false = 0
        for ev in sorted(events, key=lambda e: e.step):
            i = _incident_of(ev.step, incs)
            if i is None:
                n_false += 1
                self.false.append(f"{trace.name}@{ev.step}:{ev.detector}")
            elif i in first:
                self.duplicates += 1
            else:
                first[i] = ev.step
        self.false_alarms += n_false
        if trace.family == "clean":
            self.clean_traces += 1
            self.clean_false_alarms += n_false
            self.clean_traces_alarmed += int(n_false > 0)
        for i, inc in enumerate(incs):
            self.incidents += 1
            hits = (
                self.by_shape.setdefault(inc.shape, [0, 0, 0]),
                self.by_kind.setdefault(inc.kind, [0, 0, 0]),
            )
            for h in hits:
                h[0] += 1
            if i in first:
                lat = first[i] - inc.onset
                self.detected += 1
                self.latencies.append(lat)
                ok = in_time(inc, lat)
                self.in_time += ok
                for h in hits:
                    h[1] += 1
                    h[2] += ok
            else:
                self.missed.append(f"{trace.name}:{inc.shape}@{inc.onset}")
            if inc.cross is not None:
                lead = inc.cross - first[i] if i in first else None
                self.crossings.setdefault(inc.shape, []).append(lead)
        # every run of non-finite rows must be flagged on its first row
        nf_steps = {ev.step for ev in events if ev.kind == "nonfinite"}
        prev_bad = False
        for row in trace.rows:
            bad = any(
                isinstance(row.get(k), float) and not math.isfinite(row[k])
                for k in ("loss", "grad_norm")
            )
            if bad and not prev_bad:
                self.nonfinite_runs += 1
                self.nonfinite_first_step += int(row["step"] in nf_steps)
            prev_bad = bad

    def summary(self) -> dict[str, Any]:
        det = self.detected
        prec = det / (det + self.false_alarms) if det + self.false_alarms else math.nan
        lat = self.latencies
        return {
            "incidents": self.incidents,
            "precision": prec,
            "recall": det / self.incidents if self.incidents else math.nan,
            "recall_in_time": self.in_time / self.incidents if self.incidents else math.nan,
            "latency_mean": statistics.fmean(lat) if lat else math.nan,
            "latency_median": statistics.median(lat) if lat else math.nan,
            "latency_max": max(lat) if lat else math.nan,
            "false_alarms": self.false_alarms,
            "clean_traces": self.clean_traces,
            "clean_traces_alarmed": self.clean_traces_alarmed,
            "clean_false_alarms": self.clean_false_alarms,
            "duplicates": self.duplicates,
            "nonfinite_runs": self.nonfinite_runs,
            "nonfinite_first_step": self.nonfinite_first_step,
            "crossings": {k: _crossings(v) for k, v in sorted(self.crossings.items())},
            "by_kind": _breakdown(self.by_kind),
            "by_shape": _breakdown(self.by_shape),
            "missed": self.missed[:50],
            "false": self.false[:50],
        }


def _onset_leads(leads: Sequence[int | None]) -> dict[str, Any]:
    """Steps before the loss moves (the onset) a leading detector first warned, per blow-up."""
    fired = [x for x in leads if x is not None]
    ahead = [x for x in fired if x > 0]
    return {
        "n": len(leads),
        "fired": len(fired),
        "ahead": len(ahead),
        "lead_mean": statistics.fmean(fired) if fired else math.nan,
        "lead_median": statistics.median(fired) if fired else math.nan,
    }


def _crossings(leads: Sequence[int | None]) -> dict[str, Any]:
    """Warned before the loss passed the loss at init: count, share, mean lead."""
    warned = [x for x in leads if x is not None and x > 0]
    return {
        "n": len(leads),
        "warned": len(warned),
        "warned_share": len(warned) / len(leads) if leads else math.nan,
        "lead_mean": statistics.fmean(warned) if warned else math.nan,
        "lead_median": statistics.median(warned) if warned else math.nan,
    }


def _breakdown(counts: Mapping[str, list[int]]) -> dict[str, dict[str, float]]:
    return {
        k: {"n": v[0], "recall": v[1] / v[0], "recall_in_time": v[2] / v[0]}
        for k, v in sorted(counts.items())
    }


@dataclass
class Lead:
    """Lead time of leading detectors over the loss detector on incidents with a precursor."""

    incidents: int = 0
    leading_fired: int = 0
    before_loss: int = 0
    before_onset: int = 0
    leads_vs_loss: list[int] = field(default_factory=list)
    leads_vs_onset: list[int] = field(default_factory=list)

    def add(
        self,
        trace: Trace,
        events: Mapping[str, Sequence[Event]],
        leading: Sequence[str],
        metric: str | None = None,
    ) -> None:
        """Count the trace's precursor incidents (those growing ``metric``, if given)."""
        for inc in trace.incidents:
            if not inc.precursor or (metric is not None and metric not in inc.precursor):
                continue
            self.incidents += 1

            def first(names: Sequence[str], inc: Incident = inc) -> int | None:
                steps = [
                    e.step
                    for n in names
                    for e in events.get(n, ())
                    if inc.start <= e.step <= inc.end
                ]
                return min(steps) if steps else None

            t_lead = first(leading)
            t_loss = first([LOSS_DETECTOR])
            if t_lead is None:
                continue
            self.leading_fired += 1
            self.leads_vs_onset.append(inc.onset - t_lead)
            self.before_onset += int(t_lead < inc.onset)
            if t_loss is not None:
                self.leads_vs_loss.append(t_loss - t_lead)
                self.before_loss += int(t_lead < t_loss)

    def summary(self) -> dict[str, Any]:
        def stats(x: list[int]) -> dict[str, float]:
            if not x:
                return {"mean": math.nan, "median": math.nan, "min": math.nan, "max": math.nan}
            return {
                "mean": statistics.fmean(x),
                "median": statistics.median(x),
                "min": min(x),
                "max": max(x),
            }

        n = self.incidents
        return {
            "incidents": n,
            "leading_fired": self.leading_fired / n if n else math.nan,
            "before_loss": self.before_loss / n if n else math.nan,
            "before_onset": self.before_onset / n if n else math.nan,
            "lead_vs_loss_steps": stats(self.leads_vs_loss),
            "lead_vs_onset_steps": stats(self.leads_vs_onset),
        }


def evaluate(
    traces: Sequence[Trace],
    names: Sequence[str] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    sets: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Score every detector in ``names`` and every named set of them on ``traces``.

    Args:
        traces: Labelled traces.
        names: Detectors to run (default: all registered).
        params: Parameters per detector.
        sets: Named detector sets scored on the union of their members' events (default:
            ``{"default": DEFAULT_DETECTORS}``).

    Returns:
        ``{"detectors": {name: summary}, "sets": {name: summary}, "lead": {...},
        "onset_leads": {leading detector: ...}, "calm_loss_alarms": [...],
        "cost_us": {name: mean microseconds per update}, "traces": count}``. ``onset_leads``
        covers the blow-ups (incidents with a ``cross``): how many steps before the loss moved
        each leading detector first warned; ``calm_loss_alarms`` lists the loss events (kind
        ``spike``) of the sets' detectors on clean traces.
    """
    names = list(names or REGISTRY)
    sets = dict(sets or {"default": DEFAULT_DETECTORS})
    needed = list(dict.fromkeys([*names, *(n for s in sets.values() for n in s)]))
    scores = {n: Score() for n in [*names, "(oracle)"]}
    set_scores = {s: Score() for s in sets}
    leads = {
        n: Lead() for n in [*LEADING_DETECTORS, "any_leading"] if n in needed or n == "any_leading"
    }
    costs: dict[str, list[float]] = {n: [] for n in needed}
    onset_leads: dict[str, list[int | None]] = {n: [] for n in LEADING_DETECTORS if n in needed}
    calm_loss_alarms: list[str] = []
    for tr in traces:
        events, cost = run_trace(tr, needed, params)
        for inc in tr.incidents:
            if inc.cross is None:
                continue
            for n in onset_leads:
                steps = [e.step for e in events[n] if inc.start <= e.step <= inc.end]
                onset_leads[n].append(inc.onset - min(steps) if steps else None)
        if tr.family == "clean":
            calm_loss_alarms += [f"{tr.name}@{e.step}:{e.detector}" for n in needed
                                 for e in events[n] if e.kind == "spike"
                                 and n in {m for ms in sets.values() for m in ms}]
        for n in needed:
            costs[n].append(cost[n])
        for n in names:
            scores[n].add(tr, events[n])
        if tr.trend is not None:  # synthetic traces only
            scores["(oracle)"].add(tr, oracle_events(tr))
        for s, members in sets.items():
            set_scores[s].add(tr, [e for m in members for e in events[m]])
        for n, lead in leads.items():
            if n == "any_leading":
                lead.add(tr, events, [m for m in LEADING_DETECTORS if m in needed])
            else:
                lead.add(tr, events, [n], LEADING_METRIC[n])
    return {
        "traces": len(traces),
        "families": [tr.family for tr in traces],
        "detectors": {n: s.summary() for n, s in scores.items()},
        "sets": {s: sc.summary() for s, sc in set_scores.items()},
        "lead": {n: lead.summary() for n, lead in leads.items()},
        "onset_leads": {n: _onset_leads(v) for n, v in onset_leads.items()},
        "calm_loss_alarms": calm_loss_alarms,
        "cost_us": {n: statistics.fmean(c) for n, c in costs.items() if c},
    }
