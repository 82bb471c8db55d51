"""ablation: each change of the recipe table applied alone to GPT and removed alone from Llama2,
where the recipes separate; held-out loss paired by seed, Holm-corrected over the family."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from analysis import style
from analysis import verdicts as V
from analysis.figures import common as C
from analysis.figures.lr_grid import _levels_text

KEY = "+sweep/ablation"
CHANGES = ("rmsnorm", "scaled_embedding", "z_loss", "eps", "init_std", "arch")
LABELS = {"rmsnorm": "RMSNorm", "scaled_embedding": "scaled emb.", "z_loss": "z-loss 1e-4",
          "eps": "Adam eps 1e-5", "init_std": "init std 0.02",
          "arch": "RoPE, SwiGLU, no bias, untied"}


def variant_of(overrides: Sequence[str]) -> str | None:
    """The ablation variant (``gpt``, ``gpt+eps``, ``llama2-arch``, ...) named in overrides."""
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+") == KEY.lstrip("+"):
            return value
    return None


def _label(variant: str) -> str:
    for sep, word in (("+", "GPT + "), ("-", "Llama2 − ")):
        _, s, change = variant.partition(sep)
        if s and change in LABELS:
            return word + LABELS[change]
    return {"gpt": "GPT recipe", "llama2": "Llama2 recipe"}.get(variant, variant)


def holm_adjusted(tests: Mapping[str, C.Comparison]) -> dict[str, C.Comparison]:
    """The comparisons with their p-values Holm-adjusted over the testable ones, and their
    verdicts decided on the adjusted p-values."""
    keys = [k for k, t in tests.items() if t.verdict != C.UNTESTABLE]
    adjusted = dict(zip(keys, V.holm([tests[k].test.p for k in keys]), strict=True))
    out = {}
    for k, t in tests.items():
        if k in adjusted:
            p = adjusted[k]
            test = dataclasses.replace(
                t.test, p=p, verdict=C.REPRODUCED if p < V.ALPHA else C.NOT,
                detail=f"{t.test.detail}; Holm-adjusted over {len(keys)} from p = "
                       f"{t.test.p:.3g}")
            t = dataclasses.replace(t, test=test)
        out[k] = t
    return out


def ablation(data, scale: str, info: Mapping[str, Mapping] | None = None) -> C.FigureResult:
    """(a) Held-out loss (capped at the unigram level) and (b) peak training loss of every
    variant where the recipes separate. A change is tested twice, paired by seed: applied to
    GPT it should lower the held-out loss, removed from Llama2 raise it; the family's p-values
    are Holm-adjusted."""
    info = info or {}
    runs = C.with_columns(data.runs)
    runs["variant"] = runs["run_id"].map(
        {rid: variant_of(info.get(rid, {}).get("overrides", ())) for rid in runs["run_id"]})
    runs = runs[runs["variant"].notna()]
    runs = runs.assign(c=C.capped(runs))
    present = set(runs["variant"])
    order = [v for v in ["gpt", *(f"gpt+{c}" for c in CHANGES), "llama2",
                         *(f"llama2-{c}" for c in CHANGES)] if v in present]
    raw: dict[str, C.Comparison] = {}
    test_arms: dict[str, list[str]] = {}
    for c in CHANGES:
        if {f"gpt+{c}", "gpt"} <= present:
            test_arms[f"gpt+{c}_lower"] = ["gpt", f"gpt+{c}"]
            raw[f"gpt+{c}_lower"] = C.compare(
                C.per_seed(runs, "c", f"gpt+{c}"), C.per_seed(runs, "c", "gpt"),
                testable=C.is_testable(runs, ["gpt", f"gpt+{c}"]))
        if {f"llama2-{c}", "llama2"} <= present:
            test_arms[f"llama2-{c}_higher"] = ["llama2", f"llama2-{c}"]
            raw[f"llama2-{c}_higher"] = C.compare(
                C.per_seed(runs, "c", "llama2"), C.per_seed(runs, "c", f"llama2-{c}"),
                testable=C.is_testable(runs, ["llama2", f"llama2-{c}"]))
    tests = holm_adjusted(raw)
    numbers = {"lr": float(runs["lr"].max()) if len(runs) else None,
               "regime": C.regime(runs.iloc[0]) if len(runs) else "",
               "eval_loss_capped": C.by_variant(runs, "c", order),
               "peak_loss": C.by_variant(runs, "peak_loss", order, log=True),
               "diverged_runs": {v: "{}/{}".format(int(g["diverged"].sum()), len(g))
                                 for v in order for g in [runs[runs["variant"] == v]]},
               "untestable": sorted(k for k, t in tests.items() if t.verdict == C.UNTESTABLE)}

    fig, axes = plt.subplots(1, 2, figsize=style.figsize("double", 0.55))
    y = np.arange(len(order))[::-1].astype(float)
    y[[i for i, v in enumerate(order) if v.startswith("gpt")]] += 0.6  # gap between families
    ypos = dict(zip(order, y, strict=True))

    def bars(ax, stats: Mapping[str, Mapping], log: bool = False) -> None:
        for v in order:
            st = stats[v]
            fam = "gpt" if v.startswith("gpt") else "llama2"
            base = v in ("gpt", "llama2")
            err = ([[st["mean"] - st["lo"]], [st["hi"] - st["mean"]]]
                   if st["n"] > 1 and math.isfinite(st["lo"]) else None)
            ax.barh(ypos[v], st["mean"], 0.7, color=style.RECIPE_COLORS[fam],
                    alpha=1.0 if base else 0.55, edgecolor="black" if base else "none",
                    linewidth=0.6, xerr=err, error_kw={"elinewidth": 0.7, "capsize": 1.5})
            seeds = list(st.get("per_seed", {}).values())
            ax.scatter(seeds, np.full(len(seeds), ypos[v]), s=4, color="0.15", zorder=3)

    bars(axes[0], numbers["eval_loss_capped"])
    bars(axes[1], numbers["peak_loss"])
    axes[1].set_xscale("log")
    C.level_lines(axes[0], runs, which="x")
    for v in order:
        axes[0].annotate(f"{numbers['diverged_runs'][v]} div.", (1.0, ypos[v]),
                         xycoords=("axes fraction", "data"), xytext=(2, 0),
                         textcoords="offset points", va="center", fontsize=5.5, color="0.3")
    axes[0].set_xlabel("Held-out loss, capped at the\nunigram level (nats/token)")
    axes[1].set_xlabel("Peak training loss\n(nats/token, log scale)")
    for ax in axes:
        ax.set_yticks(y, [_label(v) for v in order] if ax is axes[0] else [])
        ax.set_ylim(y.min() - 0.6, y.max() + 0.6)
    lo = min((s["mean"] for s in numbers["eval_loss_capped"].values()), default=0.0)
    axes[0].set_xlim(left=max(0.0, lo - 0.5))
    axes[0].set_title(f"(a) held-out loss, LR {numbers['lr']:g}", loc="left", fontsize=7)
    axes[1].set_title("(b) how far the loss blew up", loc="left", fontsize=7)
    fig.text(0.01, -0.03, f"{numbers['regime']}, peak LR {numbers['lr']:g}. GPT + X: the GPT "
             "recipe with one change of the Llama2 recipe; Llama2 − X: the Llama2 recipe with "
             "that change undone.\nBars: mean over seeds, whiskers: 95% t-interval, dots: seeds; "
             "div.: diverged runs (held-out loss above the unigram level, or non-finite).",
             fontsize=5.5, color="0.35", va="top")
    fig.tight_layout()

    def word(key: str, t: C.Comparison) -> str:
        if t.verdict == C.UNTESTABLE:
            return f"{key}: untestable"
        return (f"{key}: {-t.diff.mean if key.startswith('gpt') else t.diff.mean:+.2f} nats "
                f"({t.wins}/{t.n} seeds), {t.verdict} (Holm p = {t.test.p:.3g})")

    e = numbers["eval_loss_capped"]
    finding = (f"{numbers['regime']}, LR {numbers['lr']:g}: held-out loss (capped) and diverged "
               "runs " + ", ".join(f"{_label(v)} {C.fmt(e[v])} ({numbers['diverged_runs'][v]})"
                                   for v in order)
               + ". Change in held-out loss when a change is applied to GPT / removed from "
                 "Llama2: " + "; ".join(word(k, t) for k, t in tests.items()) + ". "
               + _levels_text(runs, order))
    run_json = {r["run_id"]: C.per_run_entry(r) for _, r in runs.iterrows()}
    return C.result(fig, tests, finding, numbers, run_json,
                    C.definitions("eval_loss", "diverged", holm=(
                        "the ablation's paired p-values are Holm-adjusted over its testable "
                        "comparisons; each comparison's verdict uses the adjusted p-value")),
                    runs, test_arms, C.grid_json(runs), adjust=True)
