"""ablation: each change of the recipe table applied alone to GPT and removed alone from Llama2,
as bars of LR sensitivity and best final loss over the LR grid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import style
from analysis.figures import common as C

KEY = "+sweep/ablation"
CHANGES = ("rmsnorm", "scaled_embedding", "z_loss", "eps", "init_std", "lr_warmup", "arch")
LABELS = {"rmsnorm": "RMSNorm", "scaled_embedding": "scaled emb.", "z_loss": "z-loss 1e-4",
          "eps": "Adam eps 1e-5", "init_std": "init std 0.02", "lr_warmup": "min LR, warmup",
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
        base, s, change = variant.partition(sep)
        if s and change in LABELS:
            return word + LABELS[change]
    return {"gpt": "GPT recipe", "llama2": "Llama2 recipe"}.get(variant, variant)


def _per_seed(numbers: dict, metric: str, name: str) -> pd.Series:
    values = numbers[metric].get(name, {}).get("per_seed", {})
    return pd.Series({int(k): v for k, v in values.items()}, dtype=float)


def _diverged(runs: pd.DataFrame, variant: str) -> tuple[int, int]:
    g = runs[runs["variant"] == variant]
    return int(g["diverged"].sum()), len(g)


def ablation(data, scale: str, info: Mapping[str, Mapping] | None = None) -> C.FigureResult:
    """(a) LR sensitivity and (b) best final loss of every variant over the LR grid; (c) where
    the study has a separating part: the final loss of GPT with each change alone at the LR where
    plain GPT blows up. A change's verdict combines the LR-sensitivity tests (applied to GPT,
    removed from Llama2) and, where tested, whether it alone prevents the blow-up."""
    info = info or {}
    part = {rid: info.get(rid, {}).get("part", "main") for rid in data.runs["run_id"]}
    names = {rid: variant_of(info.get(rid, {}).get("overrides", ()))
             for rid in data.runs["run_id"]}
    allruns = C.with_columns(data.runs)
    allruns["variant"] = allruns["run_id"].map(names)
    allruns["part"] = allruns["run_id"].map(part)
    allruns = allruns[allruns["variant"].notna()]
    runs = allruns[allruns["part"] == "main"]
    sep = allruns[allruns["part"] == "separating"]
    numbers = C.lr_grid_numbers(runs)
    order = [v for v in ["gpt", *(f"gpt+{c}" for c in CHANGES), "llama2",
                         *(f"llama2-{c}" for c in CHANGES)] if v in numbers["lr_sensitivity"]]
    sep_order = [v for v in ["gpt", *(f"gpt+{c}" for c in CHANGES), "llama2"]
                 if v in set(sep["variant"])]
    if len(sep):
        numbers["separating"] = {
            "lr": float(sep["lr"].max()), "regime": C.regime(sep.iloc[0]),
            "final_loss": {v: C.stat_dict(C.seed_ci(C.capped_final(g)), dict(zip(
                g["seed"], C.capped_final(g), strict=True)))
                for v in sep_order for g in [sep[sep["variant"] == v]]},
            "diverged": {v: "{}/{}".format(*_diverged(sep, v)) for v in sep_order}}
    changes: dict[str, dict] = {}
    verdicts = []
    for c in CHANGES:
        entry: dict = {}
        parts = []
        if f"gpt+{c}" in numbers["lr_sensitivity"]:
            add = C.compare(_per_seed(numbers, "lr_sensitivity", f"gpt+{c}"),
                            _per_seed(numbers, "lr_sensitivity", "gpt"))
            entry["applied_to_gpt_lowers_sensitivity"] = add.to_json()
            parts.append(add.verdict)
        if f"llama2-{c}" in numbers["lr_sensitivity"]:
            rem = C.compare(_per_seed(numbers, "lr_sensitivity", "llama2"),
                            _per_seed(numbers, "lr_sensitivity", f"llama2-{c}"))
            entry["removed_from_llama2_raises_sensitivity"] = rem.to_json()
            parts.append(rem.verdict)
        if f"gpt+{c}" in sep_order and "gpt" in sep_order:
            base_div, n = _diverged(sep, "gpt")
            div, m = _diverged(sep, f"gpt+{c}")
            if base_div:  # testable only where plain GPT blew up
                v = C.REPRODUCED if div == 0 else (C.PARTLY if div < base_div else C.NOT)
                entry["prevents_blowup"] = {"gpt_diverged": f"{base_div}/{n}",
                                            "with_change_diverged": f"{div}/{m}", "verdict": v}
                parts.append(v)
        if parts:
            entry["verdict"] = C.combine(parts)
            verdicts.append(entry["verdict"])
            changes[c] = entry
    numbers["changes"] = changes

    panels = 3 if len(sep) else 2
    fig, axes = plt.subplots(1, panels, figsize=style.figsize("double", 0.55),
                             gridspec_kw={"width_ratios": [1, 1, 0.8][:panels]})
    y = np.arange(len(order))[::-1].astype(float)
    y[[i for i, v in enumerate(order) if v.startswith("gpt")]] += 0.6  # gap between families
    ypos = dict(zip(order, y, strict=True))

    def bars(ax, stats: Mapping[str, Mapping], names: Sequence[str]) -> None:
        for v in names:
            st = stats[v]
            fam = "gpt" if v.startswith("gpt") else "llama2"
            base = v in ("gpt", "llama2")
            err = ([[st["mean"] - st["lo"]], [st["hi"] - st["mean"]]]
                   if st["n"] > 1 and st["lo"] is not None and np.isfinite(st["lo"]) else None)
            ax.barh(ypos[v], st["mean"], 0.7, color=style.RECIPE_COLORS[fam],
                    alpha=1.0 if base else 0.55, edgecolor="black" if base else "none",
                    linewidth=0.6, xerr=err, error_kw={"elinewidth": 0.7, "capsize": 1.5})
            seeds = list(st.get("per_seed", {}).values())
            ax.scatter(seeds, np.full(len(seeds), ypos[v]), s=4, color="0.15", zorder=3)
            if base:
                ax.axvline(st["mean"], color=style.RECIPE_COLORS[fam], linestyle=":",
                           linewidth=0.8)

    bars(axes[0], numbers["lr_sensitivity"], order)
    bars(axes[1], numbers["best_final_loss"], order)
    lrs = sorted(set(runs["lr"]))
    axes[0].set_xlabel("LR sensitivity\n(nats; lower: more stable)")
    axes[1].set_xlabel("Best final loss\nover the LRs (nats/token)")
    for ax in axes:
        ax.set_yticks(y, [_label(v) for v in order] if ax is axes[0] else [])
        ax.set_ylim(y.min() - 0.6, y.max() + 0.6)
    axes[0].set_title("(a) LR sensitivity", loc="left", fontsize=7)
    axes[1].set_title("(b) best final loss", loc="left", fontsize=7)
    lo = min(numbers["best_final_loss"][v]["mean"] for v in order)
    axes[1].set_xlim(left=max(0.0, lo - 0.5))
    if len(sep):
        sn = numbers["separating"]
        bars(axes[2], sn["final_loss"], sep_order)
        init = float(np.nanmedian(sep["loss_at_init"]))
        axes[2].axvline(init, color="0.5", linestyle=":", linewidth=0.8)
        for v in sep_order:
            axes[2].annotate(f"{sn['diverged'][v]} div.", (init, ypos[v]), xytext=(3, 0),
                             textcoords="offset points", va="center", fontsize=5.5,
                             color="0.3")
        axes[2].set_xlabel("Final loss, capped\nat init (nats/token)")
        axes[2].set_title(f"(c) LR {sn['lr']:g}, no clipping", loc="left", fontsize=7)
        axes[2].set_xlim(left=max(0.0, min(sn["final_loss"][v]["mean"] for v in sep_order)
                         - 0.5), right=init + 1.6)
    fig.text(0.01, -0.03, f"(a, b): {C.regime(runs.iloc[0])}, peak LRs "
             f"{', '.join(C.num(x) for x in lrs)}; (c): no clipping, weight decay 1e-4 "
             "independent of the LR, warmup 40. GPT + X: the GPT recipe with one change of the "
             "Llama2 recipe;\nLlama2 − X: the Llama2 recipe with that change undone. Bars: mean "
             "over seeds, whiskers: 95% CI, dots: seeds; dotted: the recipe's own value ((c): "
             "also the loss at init,\nwhere diverged runs are drawn); div.: diverged runs of "
             "3 seeds.", fontsize=5.5, color="0.35", va="top")
    fig.tight_layout()

    def word(c: str) -> str:
        e = changes[c]
        a = e.get("applied_to_gpt_lowers_sensitivity", {})
        r = e.get("removed_from_llama2_raises_sensitivity", {})
        # a: b - a = gpt - (gpt+c), so (gpt+c) - gpt is its negative; r: (llama2-c) - llama2.
        da = -a.get("b_minus_a", {}).get("mean", float("nan"))
        dr = r.get("b_minus_a", {}).get("mean", float("nan"))
        text = (f"{LABELS[c]}: GPT {da:+.2f} ({a.get('seeds_a_better', 0)}/"
                f"{a.get('seeds', 0)}), Llama2 {dr:+.2f} ({r.get('seeds_a_better', 0)}/"
                f"{r.get('seeds', 0)})")
        if "prevents_blowup" in e:
            b = e["prevents_blowup"]
            text += f", blow-ups {b['with_change_diverged']} vs {b['gpt_diverged']}"
        return text + f" -> {e['verdict']}"

    finding = ("Change in LR sensitivity, nats (seeds where the change helps): applied to GPT "
               "(negative = it helps) / removed from Llama2 (positive = it helped)"
               + (f"; and, at LR {numbers['separating']['lr']:g} without clipping, GPT runs "
                  "that blew up with the change alone vs plain GPT" if len(sep) else "")
               + ": " + "; ".join(word(c) for c in changes) + ".")
    run_json = {r["run_id"]: C.per_run_entry(r, part=r["part"]) for _, r in allruns.iterrows()}
    return C.FigureResult(fig, C.combine(verdicts), finding, numbers, run_json,
                          {k: C.DEFINITIONS[k] for k in ("final_loss", "lr_sensitivity",
                                                         "diverged", "ci")})
