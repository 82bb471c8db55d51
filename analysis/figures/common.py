"""Shared pieces of the paper figures: run tables with study columns, LR-grid numbers over
seeds, paired comparisons with a verdict, and the plots every figure uses."""

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
from analysis.stats import SeedStat, seed_ci

REPRODUCED, PARTLY, NOT = "reproduced", "partly", "not at this scale"

DEFINITIONS = {
    "final_loss": f"mean of the finite training losses of the last {M.FINAL_K} logged steps "
                  "(inf if the run ended non-finite)",
    "loss_at_init": "the first logged training loss of the run",
    "diverged": "a non-finite loss, or a final loss above the loss at init",
    "lr_sensitivity": "per seed, over the LR grid: mean_lr min(final loss, loss at init) - "
                      "min_lr final loss (Wortsman et al. 2023); lower is more stable",
    "max_stable_lr": "largest LR of the grid whose run did not diverge (geometric mean over "
                     "seeds)",
    "spike_incidents": f"events.jsonl events, merged when at most {M.MERGE_GAP} steps apart",
    "loss_spikes": "records whose loss is non-finite or above mean + 6 sd and 5% of the previous "
                   "50 finite losses, merged like incidents (analysis.metrics.loss_spike_steps)",
    "ci": "95% bootstrap CI over seeds (BCa, 9999 resamples, seed 0); n = seeds",
}


@dataclass
class FigureResult:
    """What a figure function returns.

    Attributes:
        fig: The matplotlib figure.
        verdict: ``reproduced``, ``partly`` or ``not at this scale``.
        finding: Our numbers in one or two sentences (the findings table's cell).
        numbers: Everything plotted or concluded, JSON-ready.
        runs: Per run directory (run id): the values of that run the numbers used.
        definitions: Metric name -> definition, for the metrics used.
    """

    fig: Any
    verdict: str
    finding: str
    numbers: dict[str, Any]
    runs: dict[str, dict[str, Any]]
    definitions: dict[str, str] = field(default_factory=dict)


# --- tables ---------------------------------------------------------------------------------


def with_columns(runs: pd.DataFrame, variant: Callable[[pd.Series], str] | None = None
                 ) -> pd.DataFrame:
    """The runs table plus ``lr``, ``seed`` and (if given) ``variant`` columns."""
    out = runs.copy()
    out["lr"] = out["optim.lr"].astype(float)
    out["seed"] = out["trainer.seed"].astype(int)
    if variant is not None:
        out["variant"] = [variant(row) for _, row in out.iterrows()]
    return out


def per_run_entry(row: pd.Series, **extra: Any) -> dict[str, Any]:
    """A run's entry in FIGURE.json: what the numbers used from it."""
    entry = {"status": row["status"], "seed": int(row["trainer.seed"]),
             "lr": float(row["optim.lr"]), "steps": row["steps"],
             "final_loss": float(row["final_loss"]), "loss_at_init": float(row["loss_at_init"]),
             "diverged": bool(row["diverged"]), "spike_incidents": int(row["num_spikes"])}
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


def lr_grid_numbers(runs: pd.DataFrame, by: Sequence[str] = ("variant",)) -> dict[str, Any]:
    """LR sensitivity, max stable LR and best final loss per group, per seed and over seeds;
    final loss per group and LR over seeds."""
    by = list(by)
    per_seed = M.grid_per_seed(runs, by=by, lr_col="lr", seed_col="seed")
    out: dict[str, Any] = {"lr_sensitivity": {}, "max_stable_lr": {}, "best_final_loss": {},
                           "final_loss": {}, "diverged_runs": {}}
    for key, group in per_seed.groupby(by, sort=False):
        name = _name(key)
        seeds = group.set_index("seed")
        out["lr_sensitivity"][name] = stat_dict(seed_ci(seeds["lr_sensitivity"]),
                                                seeds["lr_sensitivity"])
        out["max_stable_lr"][name] = stat_dict(seed_ci(seeds["max_stable_lr"], log=True),
                                               seeds["max_stable_lr"])
        out["best_final_loss"][name] = stat_dict(seed_ci(seeds["best_final_loss"]),
                                                 seeds["best_final_loss"])
    for key, group in runs.groupby(by, sort=False):
        name = _name(key)
        out["final_loss"][name] = {
            f"{lr:g}": stat_dict(seed_ci(capped_final(g)), dict(zip(g["seed"], capped_final(g),
                                                                    strict=True)))
            for lr, g in group.groupby("lr", sort=True)}
        out["diverged_runs"][name] = {f"{lr:g}": f"{int(g['diverged'].sum())}/{len(g)}"
                                      for lr, g in group.groupby("lr", sort=True)}
    return out


def _name(key: Any) -> str:
    if isinstance(key, tuple):
        return " / ".join(str(k) for k in key)
    return str(key)


def capped_final(runs: pd.DataFrame) -> np.ndarray:
    """Final loss capped at the loss at init (a diverged run counts as the init loss, as in the
    LR sensitivity); NaN (never finished) stays NaN."""
    final = runs["final_loss"].to_numpy(dtype=float)
    init = runs["loss_at_init"].to_numpy(dtype=float)
    return np.where(np.isnan(final), np.nan, np.minimum(final, init))


@dataclass(frozen=True)
class Comparison:
    """Paired comparison of a per-seed metric between two variants (``a`` expected better)."""

    a: SeedStat
    b: SeedStat
    diff: SeedStat  # b - a per seed: positive = a better (for lower-is-better)
    wins: int  # seeds where a is better
    n: int

    @property
    def verdict(self) -> str:
        """reproduced: better in every seed (>= 3 seeds); partly: better on average and in most
        seeds; otherwise not at this scale."""
        if self.n >= 3 and self.wins == self.n and self.diff.mean > 0:
            return REPRODUCED
        if self.n and self.diff.mean > 0 and self.wins * 2 > self.n:
            return PARTLY
        return NOT

    def to_json(self) -> dict[str, Any]:
        return {"a": stat_dict(self.a), "b": stat_dict(self.b), "b_minus_a": stat_dict(self.diff),
                "seeds_a_better": self.wins, "seeds": self.n, "verdict": self.verdict}


def compare(a: pd.Series, b: pd.Series, lower_is_better: bool = True, log: bool = False
            ) -> Comparison:
    """Compare per-seed values (indexed by seed) of variant a against b, paired by seed."""
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1).dropna()
    x, y = joined["a"].to_numpy(float), joined["b"].to_numpy(float)
    if log:
        x, y = np.log10(x), np.log10(y)
    sign = 1.0 if lower_is_better else -1.0
    with np.errstate(invalid="ignore"):
        diff = sign * (y - x)
    finite = np.isfinite(diff)
    return Comparison(seed_ci(a, log=log), seed_ci(b, log=log), seed_ci(diff[finite]),
                      int((diff[finite] > 0).sum()), int(finite.sum()))


def combine(verdicts: Sequence[str]) -> str:
    """All reproduced: reproduced; none better than 'not': not; else partly."""
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if all(v == NOT for v in verdicts):
        return NOT
    return PARTLY


# --- plots ----------------------------------------------------------------------------------


def plot_lr_grid(ax, runs: pd.DataFrame, order: Sequence[str], colors: Mapping[str, str],
                 value: str = "final", markers: Mapping[str, str] | None = None) -> None:
    """Final loss (capped at init) vs LR: seed mean with 95% CI band, each seed a faint dot,
    diverged runs as open markers."""
    for name in order:
        g = runs[runs["variant"] == name]
        if g.empty:
            continue
        color, marker = colors[name], (markers or {}).get(name, "o")
        y = capped_final(g) if value == "final" else g[value].to_numpy(float)
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


def init_line(ax, runs: pd.DataFrame) -> None:
    """A dotted line at the loss at init (median over runs), labelled in the axes."""
    init = float(np.nanmedian(runs["loss_at_init"].to_numpy(float)))
    ax.axhline(init, color="0.5", linestyle=":", linewidth=0.8, zorder=1)
    ax.annotate("loss at init", (0.01, init), xycoords=("axes fraction", "data"),
                xytext=(0, -2), textcoords="offset points", va="top", fontsize=6, color="0.4")


def seed_note(ax, text: str = "line: mean over seeds, band: 95% CI; dots: seeds; "
              "open: diverged (drawn at init loss)") -> None:
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
