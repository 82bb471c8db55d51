"""Shared pieces of the paper figures: run tables with study columns, LR-grid numbers over
seeds, paired comparisons with a verdict (:mod:`analysis.verdicts`), and the plots every figure
uses."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter

from analysis import metrics as M
from analysis import style
from analysis import verdicts as V
from analysis.stats import SeedStat, seed_ci

REPRODUCED, PARTLY, NOT, UNTESTABLE = V.REPRODUCED, V.PARTLY, V.NOT_REPRODUCED, V.UNTESTABLE

DEFINITIONS = {
    "eval_loss": "held-out loss: mean next-token cross-entropy (nats/token) on the held-out "
                 "split at the end of the run, whose cosine schedule ends there (annealed)",
    "levels": "the corpus's held-out unigram (add-one) and bigram (Witten-Bell) losses for the "
              "run's tokenizer (analysis/corpus.py): what token frequencies and token pairs "
              "alone achieve",
    "diverged": "a non-finite training loss, or a held-out loss above the unigram level",
    "lr_sensitivity": "per seed, over the LR grid: mean_lr min(held-out loss, unigram level) - "
                      "min_lr held-out loss (Wortsman et al. 2023, capped at the unigram level "
                      "instead of the loss at init); lower is more stable",
    "max_stable_lr": "largest LR of the grid whose run did not diverge (geometric mean over "
                     "seeds); '>=' censored when no LR diverged",
    "spike_incidents": f"events.jsonl events merged when at most {M.MERGE_GAP} steps apart, "
                       "counted apart: loss spikes, grad-norm spikes, leading alerts, "
                       "non-finite values",
    "ci": "mean over seeds and its 95% Student-t interval; the seeds themselves are listed",
    "testable": f"a comparison is testable when the best run of each arm has a held-out loss "
                f"at least {V.MARGIN_NATS:g} nat below the unigram level",
    "verdict": f"paired by seed, one-sided t-test in the claimed direction at "
               f"{V.ALPHA:g} (divergence counts: Fisher's exact test, p <= {V.ALPHA:g}): "
               "reproduced, not reproduced; a figure of several comparisons: reproduced if "
               "all are, not reproduced if none is, else partly; untestable comparisons are "
               "left out",
}


@dataclass
class FigureResult:
    """What a figure function returns.

    Attributes:
        fig: The matplotlib figure.
        verdict: reproduced, partly, not reproduced, or untestable at this scale.
        finding: Our numbers in one or two sentences (the findings table's cell).
        numbers: Everything plotted or concluded, JSON-ready.
        runs: Per run directory (run id): the values of that run the numbers used.
        definitions: Metric name -> definition, for the metrics used.
        tests: The comparisons behind the verdict (name -> :meth:`Comparison.to_json`).
        levels: The corpus's unigram and bigram levels and the testability margin.
        arms: Each compared arm's best held-out loss (testable or not).
        grid: The LR grid(s) and where each arm's optimum fell.
        false_positive_rate: How often the verdict's rule says reproduced (and partly or
            better) when nothing differs (:func:`analysis.verdicts.false_positive_rate`).
    """

    fig: Any
    verdict: str
    finding: str
    numbers: dict[str, Any]
    runs: dict[str, dict[str, Any]]
    definitions: dict[str, str] = field(default_factory=dict)
    tests: dict[str, Any] = field(default_factory=dict)
    levels: dict[str, Any] = field(default_factory=dict)
    arms: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, Any] = field(default_factory=dict)
    false_positive_rate: dict[str, Any] = field(default_factory=dict)


def definitions(*keys: str, **extra: str) -> dict[str, str]:
    """The figure's definitions: the named shared ones, the levels, CI, testability and the
    verdict rule, and its own."""
    names = dict.fromkeys([*keys, "levels", "ci", "testable", "verdict"])
    return {**{k: DEFINITIONS[k] for k in names}, **extra}


# --- tables ---------------------------------------------------------------------------------


def with_columns(runs: pd.DataFrame, variant: Callable[[pd.Series], str] | None = None
                 ) -> pd.DataFrame:
    """The runs table plus ``lr``, ``seed``, ``held`` (the held-out loss, or the final loss
    without one), ``cap`` (the unigram level, or the loss at init) and (if given) ``variant``."""
    out = runs.copy()
    out["lr"] = out["optim.lr"].astype(float)
    out["seed"] = out["trainer.seed"].astype(int)
    out["held"], out["cap"] = M.held_out(out)
    if variant is not None:
        out["variant"] = [variant(row) for _, row in out.iterrows()]
    return out


def per_run_entry(row: pd.Series, **extra: Any) -> dict[str, Any]:
    """A run's entry in FIGURE.json: what the numbers used from it."""
    entry = {"status": row["status"], "seed": int(row["trainer.seed"]),
             "lr": float(row["optim.lr"]), "steps": row["steps"],
             "eval_loss": float(row["eval_loss"]), "final_loss": float(row["final_loss"]),
             "peak_loss": float(row["peak_loss"]), "unigram": float(row["unigram"]),
             "diverged": bool(row["diverged"]),
             **{k: int(row[k]) for k in M.INCIDENT_KINDS if k in row}}
    if "variant" in row:
        entry["variant"] = row["variant"]
    entry.update(extra)
    return entry


def stat_dict(stat: SeedStat, per_seed: Mapping[Any, float] | None = None) -> dict[str, Any]:
    """A :class:`SeedStat` as JSON (plus the per-seed values)."""
    out: dict[str, Any] = {"mean": stat.mean, "lo": stat.lo, "hi": stat.hi, "n": stat.n}
    if per_seed is not None:
        out["per_seed"] = {str(k): float(v) for k, v in per_seed.items()}
    return out


NO_STAT = {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}


def stat_of(numbers: Mapping[str, Any], metric: str, name: str) -> dict[str, Any]:
    """``numbers[metric][name]``, or an empty statistic (n = 0) when a variant has no runs."""
    return numbers.get(metric, {}).get(name, NO_STAT)


def fmt(stat: SeedStat | Mapping[str, Any], digits: int = 2, sci: bool = False) -> str:
    """``mean [lo, hi]`` (``mean`` alone for one seed)."""
    s = stat if isinstance(stat, Mapping) else stat.__dict__
    spec = ".1e" if sci else f".{digits}f"

    def one(x: float | None) -> str:
        return "nan" if x is None or not math.isfinite(x) else format(x, spec)

    if s["lo"] is None or not math.isfinite(s["lo"]):
        return one(s["mean"])
    return f"{one(s['mean'])} [{one(s['lo'])}, {one(s['hi'])}]"


def by_variant(runs: pd.DataFrame, column: str, order: Sequence[str], log: bool = False
               ) -> dict[str, dict[str, Any]]:
    """A per-run column over seeds, per variant, with the seeds' values."""
    return {name: stat_dict(seed_ci(g[column], log=log),
                            dict(zip(g["seed"], g[column].astype(float), strict=True)))
            for name in order for g in [runs[runs["variant"] == name]] if len(g)}


def per_seed(runs: pd.DataFrame, column: str, name: str) -> pd.Series:
    """A per-run column of one variant, indexed by seed (mean of a seed's runs)."""
    return runs[runs["variant"] == name].groupby("seed")[column].mean()


def lr_grid_numbers(runs: pd.DataFrame, by: Sequence[str] = ("variant",)) -> dict[str, Any]:
    """Per group: LR sensitivity, max stable LR (with its censoring), best held-out loss and
    best LR, per seed and over seeds; per group and LR: the held-out loss (capped at the
    unigram level), the peak training loss and the diverged runs."""
    by = list(by)
    per = M.grid_per_seed(runs.assign(eval_loss=runs["held"], unigram=runs["cap"]),
                          by=by, lr_col="lr", seed_col="seed")
    out: dict[str, Any] = {"lr_sensitivity": {}, "max_stable_lr": {}, "best_eval_loss": {},
                           "best_lr": {}, "eval_loss": {}, "peak_loss": {},
                           "diverged_runs": {}}
    for key, group in per.groupby(by, sort=False):
        name = _name(key)
        seeds = group.set_index("seed")
        out["lr_sensitivity"][name] = stat_dict(seed_ci(seeds["lr_sensitivity"]),
                                                seeds["lr_sensitivity"])
        out["max_stable_lr"][name] = {
            **stat_dict(seed_ci(seeds["max_stable_lr"], log=True), seeds["max_stable_lr"]),
            "censored": sorted(set(seeds["stable_censored"]) - {""})}
        out["best_eval_loss"][name] = stat_dict(seed_ci(seeds["best_eval_loss"]),
                                                seeds["best_eval_loss"])
        out["best_lr"][name] = {"per_seed": {str(k): float(v) for k, v in
                                             seeds["best_lr"].items()},
                                "interior_seeds": int(seeds["optimum_interior"].sum()),
                                "seeds": int(len(seeds))}
    for key, group in runs.groupby(by, sort=False):
        name = _name(key)
        out["eval_loss"][name] = {
            f"{lr:g}": stat_dict(seed_ci(capped(g)), dict(zip(g["seed"], capped(g),
                                                               strict=True)))
            for lr, g in group.groupby("lr", sort=True)}
        out["peak_loss"][name] = {f"{lr:g}": float(g["peak_loss"].max())
                                  for lr, g in group.groupby("lr", sort=True)}
        out["diverged_runs"][name] = {f"{lr:g}": f"{int(g['diverged'].sum())}/{len(g)}"
                                      for lr, g in group.groupby("lr", sort=True)}
    return out


def _name(key: Any) -> str:
    if isinstance(key, tuple):
        return " / ".join(str(k) for k in key)
    return str(key)


def capped(runs: pd.DataFrame) -> np.ndarray:
    """The held-out loss capped at the unigram level (a diverged run counts as the unigram
    level, as in the LR sensitivity); NaN (never finished) stays NaN."""
    held = runs["held"].to_numpy(dtype=float)
    cap = runs["cap"].to_numpy(dtype=float)
    return np.where(np.isnan(held), np.nan, np.minimum(np.nan_to_num(held, nan=np.inf,
                                                                     posinf=np.inf), cap))


# --- testability, comparisons ---------------------------------------------------------------


def levels(runs: pd.DataFrame) -> dict[str, Any]:
    """The corpus levels of the runs (median over runs: all runs of a study share them)."""
    uni = float(np.nanmedian(runs["unigram"].to_numpy(float))) if len(runs) else math.nan
    bi = float(np.nanmedian(runs["bigram"].to_numpy(float))) if len(runs) else math.nan
    return {"unigram": uni, "bigram": bi, "margin_nats": V.MARGIN_NATS,
            "testable_below": uni - V.MARGIN_NATS}


def arm_best(runs: pd.DataFrame, name: str, column: str = "variant") -> float:
    """The best (lowest) held-out loss of an arm's runs."""
    held = runs.loc[runs[column] == name, "held"].to_numpy(float)
    held = held[np.isfinite(held)]
    return float(held.min()) if held.size else math.nan


def arms_json(runs: pd.DataFrame, names: Sequence[str], column: str = "variant"
              ) -> dict[str, Any]:
    """Each arm's best held-out loss, against the levels."""
    lv = levels(runs)
    out = {}
    for name in names:
        best = arm_best(runs, name, column)
        out[name] = {"best_eval_loss": best,
                     "below_unigram_nats": lv["unigram"] - best,
                     "vs_bigram_nats": best - lv["bigram"]}
    return out


def is_testable(runs: pd.DataFrame, names: Sequence[str], column: str = "variant") -> bool:
    """Does every arm's best run beat the unigram level by the margin?"""
    uni = levels(runs)["unigram"]
    if not math.isfinite(uni):  # data without known levels: the training losses decide nothing
        return True
    return V.testable([arm_best(runs, n, column) for n in names], uni)


@dataclass(frozen=True)
class Comparison:
    """Paired comparison of a per-seed metric between two arms (``a`` claimed better)."""

    a: SeedStat
    b: SeedStat
    diff: SeedStat  # b - a per seed (lower is better): positive = a better
    wins: int  # seeds where a is better
    n: int
    test: V.Test

    @property
    def verdict(self) -> str:
        return self.test.verdict

    def to_json(self) -> dict[str, Any]:
        return {"a": stat_dict(self.a), "b": stat_dict(self.b), "b_minus_a": stat_dict(self.diff),
                "seeds_a_better": self.wins, "seeds": self.n, **self.test.to_json()}


def compare(a: pd.Series, b: pd.Series, *, testable: bool = True, lower_is_better: bool = True,
            log: bool = False) -> Comparison:
    """Compare per-seed values (indexed by seed) of arm a against b, paired by seed; the claim
    is that a is better (lower, unless ``lower_is_better`` is False)."""
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1).dropna()
    x, y = joined["a"].to_numpy(float), joined["b"].to_numpy(float)
    if log:
        x, y = np.log10(x), np.log10(y)
    sign = 1.0 if lower_is_better else -1.0
    with np.errstate(invalid="ignore"):
        diff = sign * (y - x)
    finite = np.isfinite(diff)
    return Comparison(seed_ci(a, log=log), seed_ci(b, log=log), seed_ci(diff[finite]),
                      int((diff[finite] > 0).sum()), int(finite.sum()),
                      V.paired(list(diff[finite]), is_testable=testable))


def combine(tests: Sequence[Comparison | V.Test]) -> str:
    """The figure's verdict (:func:`analysis.verdicts.combine`)."""
    return V.combine([t.test if isinstance(t, Comparison) else t for t in tests])


def fpr(tests: Sequence[Comparison | V.Test], adjust: bool = False) -> dict[str, float]:
    """The false-positive rate of a figure's rule over its testable comparisons (``adjust``:
    the rule uses Holm-adjusted p-values)."""
    seeds, counts = [], []
    for t in tests:
        test = t.test if isinstance(t, Comparison) else t
        if test.verdict == V.UNTESTABLE:
            continue
        if test.runs_per_arm is not None:
            counts.append(test.runs_per_arm)
        else:
            seeds.append(max(test.n, 2))
    return V.false_positive_rate(seeds, counts_runs=counts, adjust=adjust)


def count_test(runs: pd.DataFrame, worse: str, better: str, *, testable: bool,
               column: str = "variant") -> V.Test:
    """Fisher's exact test: more diverged runs in arm ``worse`` than in arm ``better``."""
    a = runs[runs[column] == worse]
    b = runs[runs[column] == better]
    return V.counts(int(a["diverged"].sum()), len(a), int(b["diverged"].sum()), len(b),
                    is_testable=testable)


def reduce_metric(runs: pd.DataFrame, metrics: pd.DataFrame, key: str, agg: str | Callable,
                  first: int | None = None, last_fraction: float | None = None) -> pd.Series:
    """A per-run reduction of a logged metric, aligned with ``runs`` (NaN where not logged):
    over all logged steps, the steps up to ``first``, or the last ``last_fraction`` of them."""
    if key not in metrics:
        return pd.Series(np.nan, index=runs.index)
    m = metrics[["run_id", "step", key]].dropna()
    if first is not None:
        m = m[m["step"] <= first]
    if last_fraction is not None:
        end = m.groupby("run_id")["step"].transform("max")
        m = m[m["step"] > end * (1.0 - last_fraction)]
    return runs["run_id"].map(m.groupby("run_id")[key].agg(agg))


def grid_json(runs: pd.DataFrame, numbers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The LR grid of a study and, per arm, where its optimum fell (interior or at an end)."""
    lrs = sorted({float(x) for x in runs["lr"]})
    out: dict[str, Any] = {"lrs": lrs, "points": len(lrs),
                           "decades": round(math.log10(lrs[-1] / lrs[0]), 2) if lrs else 0.0}
    if numbers is not None and "best_lr" in numbers:
        out["optimum"] = {
            name: {**b, "interior": f"{b['interior_seeds']}/{b['seeds']} seeds",
                   "note": "" if b["interior_seeds"] == b["seeds"] else
                   "the optimum is at an end of the grid in some seeds: the grid does not "
                   "bracket it there"}
            for name, b in numbers["best_lr"].items()}
    elif len(lrs) == 1:
        out["note"] = "one LR: a comparison at a fixed LR, not over a grid"
    return out


def result(fig: Any, tests: Mapping[str, Comparison | V.Test], finding: str,
           numbers: dict[str, Any], runs_json: dict[str, dict[str, Any]],
           defs: dict[str, str], arm_runs: pd.DataFrame, test_arms: Mapping[str, Sequence[str]],
           grid: dict[str, Any], column: str = "variant", adjust: bool = False,
           verdict: str | None = None) -> FigureResult:
    """A :class:`FigureResult` with the verdict of ``tests``, their false-positive rate, the
    corpus levels and the best held-out loss of each arm of each test (``test_arms``: test
    name -> its arms' names in ``arm_runs[column]``)."""
    listed = list(tests.values())
    names = list(dict.fromkeys(n for k in tests for n in test_arms[k]))
    out = {}
    for key, t in tests.items():
        entry = t.to_json() if isinstance(t, Comparison) else {**t.to_json(), "kind": "counts"}
        out[key] = {**entry, "arms": list(test_arms[key])}
    return FigureResult(
        fig, verdict or combine(listed), finding, numbers, runs_json, defs, tests=out,
        levels=levels(arm_runs), arms=arms_json(arm_runs, names, column), grid=grid,
        false_positive_rate=fpr(listed, adjust))


# --- per-run spike columns ----------------------------------------------------------------


def spike_columns(runs: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Per run: the grad-norm spike (log10 of max over median grad norm over the run), the
    peak grad norm, loss spikes (the loss rule of :func:`analysis.metrics.loss_spike_steps`)
    and the embeddings' per-element std at the start and the end."""
    out = runs.copy()
    out["gn_peak"] = reduce_metric(out, metrics, "grad_norm", "max")
    out["gn_median"] = reduce_metric(out, metrics, "grad_norm", "median")
    out["gn_spike"] = np.log10(out["gn_peak"] / out["gn_median"])
    out["emb_std_start"] = reduce_metric(out, metrics, "embedding_std", "first")
    out["emb_std_end"] = reduce_metric(out, metrics, "embedding_std", "last")
    spikes = {rid: len(M.merge_incidents(m["step"].to_numpy()[M.loss_spike_steps(
        m["loss"].to_numpy(float))])) for rid, m in metrics.groupby("run_id", sort=False)}
    out["loss_spikes"] = out["run_id"].map(spikes).fillna(0).astype(int)
    return out


SPIKE_DEFS = {
    "grad_norm_spike": "log10(max / median) of the logged gradient norm over the run: how far "
                       "the largest spike stands above the run's typical gradient norm "
                       "(scale-free, so scaled embeddings, whose gradients are larger "
                       "throughout, are not penalised for it)",
    "grad_norm_peak": "max logged gradient norm over the run (geometric mean over seeds)",
    "loss_spikes": "incidents of the loss rule (analysis.metrics.loss_spike_steps: 6 sigma "
                   "and 5% above the mean of the previous 50 losses, or non-finite), merged",
    "embedding_std": "metrics.jsonl embedding_std: the per-element std of the embedding "
                     "layer's output (after scaling or layernorm), first and last logged",
}


# --- plots ----------------------------------------------------------------------------------


def bars(ax, runs: pd.DataFrame, column: str, order: Sequence[str],
          colors: Mapping[str, str], values: pd.DataFrame | None = None) -> None:
    """One bar per variant (mean over seeds), the seeds as dots."""
    values = runs if values is None else values
    for i, n in enumerate(order):
        g = values[values["variant"] == n]
        ax.bar(i, np.nanmean(g[column]), 0.7, color=colors[n])
        ax.scatter(np.full(len(g), i), g[column], s=5, color="0.2", zorder=3)
    ax.set_xticks(np.arange(len(order)), order, rotation=30, ha="right", fontsize=6)
    lo = np.nanmin(values[column]) if len(values) else 0
    ax.set_ylim(bottom=max(0.0, float(lo) - 0.5))


def plot_lr_grid(ax, runs: pd.DataFrame, order: Sequence[str], colors: Mapping[str, str],
                 value: str = "held", markers: Mapping[str, str] | None = None) -> None:
    """Held-out loss (capped at the unigram level) vs LR: seed mean with 95% CI band, each seed
    a faint dot, diverged runs as open markers."""
    for name in order:
        g = runs[runs["variant"] == name]
        if g.empty:
            continue
        color, marker = colors[name], (markers or {}).get(name, "o")
        y = capped(g) if value == "held" else g[value].to_numpy(float)
        g = g.assign(_y=y)
        stats = [(lr, seed_ci(grp["_y"])) for lr, grp in g.groupby("lr", sort=True)]
        lrs = np.array([lr for lr, _ in stats])
        mean = np.array([s.mean for _, s in stats])
        lo = np.array([s.lo if math.isfinite(s.lo) else s.mean for _, s in stats])
        hi = np.array([s.hi if math.isfinite(s.hi) else s.mean for _, s in stats])
        ax.plot(lrs, mean, marker=marker, color=color, label=name, zorder=3)
        ax.fill_between(lrs, lo, hi, color=color, alpha=0.18, linewidth=0, zorder=2)
        ok = ~g["diverged"].to_numpy(bool)
        ax.scatter(g["lr"][ok], g["_y"][ok], s=6, color=color, alpha=0.45, linewidths=0,
                   zorder=2)
        ax.scatter(g["lr"][~ok], g["_y"][~ok], s=14, facecolors="none", edgecolors=color,
                   linewidths=0.7, zorder=4)
    lr_ticks(ax, sorted(set(runs["lr"])))


def lr_ticks(ax, lrs: Sequence[float], which: str = "x") -> None:
    """A log LR axis (``style.lr_axis``) labelled at the LRs of the grid (0.01, 0.03, ...)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    style.lr_axis(ax, which=which)
    axis = ax.xaxis if which == "x" else ax.yaxis
    if lrs:
        axis.set_major_locator(FixedLocator(list(lrs)))
        axis.set_major_formatter(FuncFormatter(lambda v, _p: num(v)))
        axis.set_minor_locator(NullLocator())
        lo, hi = min(lrs), max(lrs)
        (ax.set_xlim if which == "x" else ax.set_ylim)(lo / 1.4, hi * 1.4)


def level_lines(ax, runs: pd.DataFrame, which: str = "y") -> None:
    """The corpus's unigram (dotted) and bigram (dashed) levels, labelled in the axes."""
    lv = levels(runs)
    # the unigram label under its line, the bigram's over it: the bigram level is usually
    # near the bottom of the axes, and a label under it would sit on the x axis
    for key, style_, text, dy in (("unigram", ":", "unigram level", -2),
                                  ("bigram", "--", "bigram level", 2)):
        y = lv[key]
        if not math.isfinite(y):
            continue
        if which == "y":
            ax.axhline(y, color="0.5", linestyle=style_, linewidth=0.8, zorder=1)
            ax.annotate(text, (0.01, y), xycoords=("axes fraction", "data"), xytext=(0, dy),
                        textcoords="offset points", va="top" if dy < 0 else "bottom",
                        fontsize=6, color="0.4", annotation_clip=True)
        else:
            ax.axvline(y, color="0.5", linestyle=style_, linewidth=0.8, zorder=1)
            ax.annotate(text, (y, 0.01), xycoords=("data", "axes fraction"), xytext=(2, 0),
                        textcoords="offset points", ha="left", fontsize=6, color="0.4",
                        rotation=90, annotation_clip=True)


def seed_note(ax, text: str = "line: mean over seeds, band: 95% t-interval; dots: seeds; "
              "open: diverged (drawn at the unigram level)") -> None:
    ax.annotate(text, (0, -0.3), xycoords="axes fraction", fontsize=5.5, color="0.35",
                va="top")


def plot_curves(ax, metrics: pd.DataFrame, runs: pd.DataFrame, key: str,
                order: Sequence[str], colors: Mapping[str, str], smooth: int = 1,
                max_seeds: int = 10) -> None:
    """A metric over steps: each seed a thin line, the seed median a thick one."""
    for name in order:
        ids = runs.loc[runs["variant"] == name, "run_id"].tolist()[:max_seeds]
        if not ids:
            continue
        m = metrics[metrics["run_id"].isin(ids)][["run_id", "step", key]].dropna()
        if m.empty:
            continue
        wide = m.pivot_table(index="step", columns="run_id", values=key)
        if smooth > 1:
            wide = wide.rolling(smooth, min_periods=1, center=True).mean()
        for rid in wide.columns:
            ax.plot(wide.index, wide[rid], color=colors[name], alpha=0.3, linewidth=0.5)
        ax.plot(wide.index, wide.median(axis=1), color=colors[name], label=name, linewidth=1.2)
    ax.set_xlabel(style.label("step"))


def curve_panel(ax, metrics: pd.DataFrame, runs: pd.DataFrame, key: str,
                order: Sequence[str], colors: Mapping[str, str], ylabel: str, title: str, *,
                log: bool = False, smooth: int = 1) -> None:
    """A panel of :func:`plot_curves`: labelled, titled, on a log axis if ``log``."""
    plot_curves(ax, metrics, runs, key, order, colors, smooth=smooth)
    if log:
        log_axis(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left", fontsize=7)


def held_out_panel(ax, runs: pd.DataFrame, order: Sequence[str], colors: Mapping[str, str],
                   held: pd.DataFrame | None, title: str) -> None:
    """Bars of the capped held-out loss (column ``c``) with the corpus levels."""
    bars(ax, runs, "c", order, colors, held)
    level_lines(ax, runs)
    ax.set_ylabel(style.label("eval_loss"))
    ax.set_title(title, loc="left", fontsize=7)


def figure_legend(fig, ax, title: str | None = None, ncol: int | None = None) -> None:
    """One legend above all panels (call after ``tight_layout``; saving crops to fit it)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0),
                   ncol=ncol or min(len(labels), 5), title=title, borderaxespad=0.0)


def log_axis(ax, which: str = "y") -> None:
    """Log scale with plain decade labels (1, 10, 100; 10^4 and up as powers)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")

    def fmt(v: float, _pos: int) -> str:
        if v <= 0:
            return ""
        e = round(math.log10(v))
        if abs(math.log10(v) - e) > 1e-6:
            return ""
        return f"{v:g}" if -2 <= e <= 3 else f"$10^{{{e}}}$"

    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
    narrow = lo > 0 and hi / lo < 30  # under ~1.5 decades: label 2 and 5 as well
    axis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5) if narrow else (1,)))
    axis.set_major_formatter(FuncFormatter(fmt if not narrow else lambda v, _p: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def regime(row: pd.Series) -> str:
    """Short name of the optimiser regime of a run (the standard one or the separating one)."""
    clip = float(row.get("optim.clip_grad", 1.0))
    indep = bool(row.get("optim.weight_decay_lr_independent", False))
    wd = float(row.get("optim.weight_decay", 0.1))
    if clip == 0 and indep:
        return f"no clipping, wd {num(wd)} LR-indep."
    return f"clip {clip:g}, wd {num(wd)}"


def num(v: float) -> str:
    """A number the short way: 0.1, 0.03, 1e-4."""
    return f"{v:.0e}".replace("e-0", "e-") if 0 < abs(v) < 1e-3 else f"{v:g}"
