"""Figures of LR-grid studies: final loss against peak LR, variants side by side, over seeds.

gpt_vs_llama2, norm_placement, qk_norm, adam_eps, init_std, width_scaling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import style
from analysis.figures import common as C
from analysis.stats import seed_ci


def _prepare(data, variant: Callable[[pd.Series], str]) -> pd.DataFrame:
    return C.with_columns(data.runs, variant)


def _per_seed(numbers: dict, metric: str, name: str) -> pd.Series:
    values = numbers[metric].get(name, {}).get("per_seed", {})
    return pd.Series({int(k): v for k, v in values.items()}, dtype=float)


def _runs_json(runs: pd.DataFrame, **columns: Callable[[pd.Series], object]) -> dict:
    return {r["run_id"]: C.per_run_entry(r, **{k: f(r) for k, f in columns.items()})
            for _, r in runs.iterrows()}


def _grid_figure(runs: pd.DataFrame, order: Sequence[str], colors: dict[str, str],
                 title: str | None = None, width: str = "single"):
    fig, ax = plt.subplots(figsize=style.figsize(width, 0.8 if width == "single" else 0.38))
    C.plot_lr_grid(ax, runs, order, colors)
    C.init_line(ax, runs)
    ax.set_ylabel(style.label("final_loss"))
    fig.tight_layout()
    C.figure_legend(fig, ax, title=title or f"GPT recipe, {C.regime(runs.iloc[0])}",
                    ncol=2 if len(order) > 3 else None)
    return fig, ax


def _sens_finding(numbers: dict, a: str, b: str) -> str:
    sa, sb = C.stat_of(numbers, "lr_sensitivity", a), C.stat_of(numbers, "lr_sensitivity", b)
    return (f"LR sensitivity {a} {C.fmt(sa)} vs {b} {C.fmt(sb)} nats "
            f"(n={sa['n']} seeds)")


def _lr_attn(runs: pd.DataFrame, metrics: pd.DataFrame, key: str, agg: str = "max") -> pd.Series:
    """A per-run reduction of a logged metric, indexed like ``runs``."""
    if key not in metrics:
        return pd.Series(np.nan, index=runs.index)
    per = metrics[["run_id", key]].dropna().groupby("run_id")[key].agg(agg)
    return runs["run_id"].map(per)


# --- gpt_vs_llama2 --------------------------------------------------------------------------


def _part(runs: pd.DataFrame, info: Mapping[str, Mapping] | None, part: str) -> pd.DataFrame:
    """The runs of one part of the study (all runs when there are no parts)."""
    if not info:
        return runs if part == "main" else runs.iloc[0:0]
    keep = runs["run_id"].map(lambda r: info.get(r, {}).get("part", "main") == part)
    return runs[keep.astype(bool)]


def _recipes(runs: pd.DataFrame, numbers: dict) -> tuple[C.Comparison, C.Comparison, pd.Series]:
    sens = C.compare(_per_seed(numbers, "lr_sensitivity", "llama2"),
                     _per_seed(numbers, "lr_sensitivity", "gpt"))
    loss = C.compare(_per_seed(numbers, "best_final_loss", "llama2"),
                     _per_seed(numbers, "best_final_loss", "gpt"))
    wide = runs.assign(y=C.capped_final(runs)).pivot_table(
        index=["lr", "seed"], columns="variant", values="y")
    both = {"gpt", "llama2"} <= set(wide.columns)
    gaps = (wide["gpt"] - wide["llama2"]).dropna() if both else pd.Series(dtype=float)
    return sens, loss, gaps


def gpt_vs_llama2(data, scale: str, info: Mapping[str, Mapping] | None = None
                  ) -> C.FigureResult:
    """(a) Final loss vs LR of both recipes as published (scaled); (b) the same in the regime
    that separates them (no clipping, LR-independent weight decay); (c) loss curves there at
    the largest LR. The verdict is on stability (LR sensitivity, paired by seed, in both
    regimes); loss is reported beside it."""
    allruns = _prepare(data, lambda r: str(r["recipe"]))
    main, sep = _part(allruns, info, "main"), _part(allruns, info, "separating")
    order = [n for n in ("gpt", "llama2") if n in set(allruns["variant"])]
    colors = style.palette(order)
    numbers = C.lr_grid_numbers(main)
    sens, loss, gaps = _recipes(main, numbers)
    numbers["stability"] = sens.to_json()
    numbers["best_loss"] = loss.to_json()
    numbers["loss_gap_gpt_minus_llama2"] = {
        "min": float(gaps.min()) if len(gaps) else None,
        "max": float(gaps.max()) if len(gaps) else None,
        "pairs_llama2_lower": int((gaps > 0).sum()), "pairs": int(len(gaps))}
    panels = 1 + (2 if len(sep) else 0)
    fig, axes = plt.subplots(1, panels, figsize=style.figsize(
        "double" if panels > 1 else "single", 0.34 if panels > 1 else 0.8), squeeze=False)
    axes = axes[0]
    C.plot_lr_grid(axes[0], main, order, colors)
    C.init_line(axes[0], main)
    axes[0].set_ylabel(style.label("final_loss"))
    reg = C.regime(main.iloc[0]) if len(main) else ""
    axes[0].set_title(f"(a) recipes as published: {reg}", loc="left", fontsize=7)
    verdicts = [sens.verdict]
    finding = (f"Standard regime ({reg}): {_sens_finding(numbers, 'llama2', 'gpt')}; Llama2 "
               f"less sensitive in {sens.wins}/{sens.n} seeds. Best final loss llama2 "
               f"{C.fmt(loss.a)} vs gpt {C.fmt(loss.b)}; Llama2 lower at "
               f"{int((gaps > 0).sum())}/{len(gaps)} (LR, seed) pairs"
               + (f", by {gaps.min():.2f} to {gaps.max():.2f} nats." if len(gaps) else "."))
    if len(sep):
        sep_numbers = C.lr_grid_numbers(sep)
        s_sens, s_loss, _ = _recipes(sep, sep_numbers)
        sep_numbers["stability"] = s_sens.to_json()
        numbers["separating"] = sep_numbers
        C.plot_lr_grid(axes[1], sep, order, colors)
        C.init_line(axes[1], sep)
        axes[1].set_ylabel(style.label("final_loss"))
        sreg = C.regime(sep.iloc[0])
        axes[1].set_title(f"(b) {sreg},\nwarmup 40 of an 800-step cosine", loc="left",
                          fontsize=7)
        top = sep["lr"].max()
        at = sep[np.isclose(sep["lr"], top)]
        C.plot_curves(axes[2], data.metrics, at, "loss", order, colors)
        C.log_axis(axes[2])
        axes[2].set_ylabel("Training loss (nats/token, log scale)")
        axes[2].set_title(f"(c) {sreg.split(',')[0]}: loss at peak LR {top:g}", loc="left",
                          fontsize=7)
        div = sep_numbers["diverged_runs"]
        verdicts.append(s_sens.verdict)
        finding += (f" Separating regime ({sreg}, warmup 40 of 800): diverged runs by LR: "
                    + "; ".join(f"{v} " + ", ".join(f"LR {lr}: {n}" for lr, n in div[v].items())
                                for v in order)
                    + f"; {_sens_finding(sep_numbers, 'llama2', 'gpt')}, Llama2 less sensitive "
                      f"in {s_sens.wins}/{s_sens.n} seeds.")
    fig.tight_layout()
    C.figure_legend(fig, axes[0])
    C.seed_note(axes[0])
    return C.FigureResult(fig, C.combine(verdicts), finding, numbers, _runs_json(allruns),
                          {k: C.DEFINITIONS[k] for k in ("final_loss", "lr_sensitivity",
                                                         "max_stable_lr", "diverged", "ci")})


# --- norm placement -------------------------------------------------------------------------


def norm_placement(data, scale: str) -> C.FigureResult:
    runs = _prepare(data, lambda r: f"{r['model.norm_position']}-LN")
    order = [n for n in ("pre-LN", "post-LN", "sandwich-LN") if n in set(runs["variant"])]
    numbers = C.lr_grid_numbers(runs)
    post = C.compare(_per_seed(numbers, "lr_sensitivity", "pre-LN"),
                     _per_seed(numbers, "lr_sensitivity", "post-LN"))
    sand = C.compare(_per_seed(numbers, "lr_sensitivity", "sandwich-LN"),
                     _per_seed(numbers, "lr_sensitivity", "pre-LN"))
    numbers["pre_vs_post"] = post.to_json()
    numbers["sandwich_vs_pre"] = sand.to_json()
    fig, ax = _grid_figure(runs, order, style.palette(order))
    C.seed_note(ax)
    def s(name: str) -> dict:
        return C.stat_of(numbers, "lr_sensitivity", name)

    finding = (f"LR sensitivity pre {C.fmt(s('pre-LN'))}, post {C.fmt(s('post-LN'))}, "
               f"sandwich {C.fmt(s('sandwich-LN'))} nats; post-LN worse than pre-LN in "
               f"{post.wins}/{post.n} seeds, sandwich better than pre in {sand.wins}/{sand.n}.")
    # The claim is post-LN's instability; sandwich's extra stability is reported beside it.
    return C.FigureResult(fig, post.verdict, finding, numbers, _runs_json(runs),
                          {k: C.DEFINITIONS[k] for k in ("final_loss", "lr_sensitivity",
                                                         "diverged", "ci")})


# --- qk_norm --------------------------------------------------------------------------------


def qk_norm(data, scale: str) -> C.FigureResult:
    runs = _prepare(data, lambda r: "QK-layernorm" if r["model.qk_layernorm"] else "no QK-norm")
    runs["attn_logit_max"] = _lr_attn(runs, data.metrics, "attn_logit_max")
    order = [n for n in ("no QK-norm", "QK-layernorm") if n in set(runs["variant"])]
    colors = style.palette(order)
    numbers = C.lr_grid_numbers(runs)
    sens = C.compare(_per_seed(numbers, "lr_sensitivity", "QK-layernorm"),
                     _per_seed(numbers, "lr_sensitivity", "no QK-norm"))
    numbers["stability"] = sens.to_json()
    attn: dict[str, dict] = {}
    for name, g in runs.groupby("variant"):
        attn[name] = {f"{lr:g}": C.stat_dict(seed_ci(gg["attn_logit_max"], log=True),
                                              dict(zip(gg["seed"], gg["attn_logit_max"],
                                                       strict=True)))
                      for lr, gg in g.groupby("lr")}
    numbers["attn_logit_max"] = attn
    fig, (a1, a2) = plt.subplots(1, 2, figsize=style.figsize("double", 0.36))
    for name in order:
        g = runs[runs["variant"] == name]
        st = [(lr, seed_ci(gg["attn_logit_max"], log=True)) for lr, gg in g.groupby("lr")]
        a1.plot([s[0] for s in st], [s[1].mean for s in st], marker="o", color=colors[name],
                label=name)
        a1.scatter(g["lr"], g["attn_logit_max"], s=6, color=colors[name], alpha=0.45,
                   linewidths=0)
    C.lr_ticks(a1, sorted(set(runs["lr"])))
    C.log_axis(a1)
    a1.set_ylabel("Max attention logit q·k/√d_h\n(max over steps, log scale)")
    a1.set_title("(a) attention-logit growth", loc="left")
    C.plot_lr_grid(a2, runs, order, colors)
    C.init_line(a2, runs)
    a2.set_ylabel(style.label("final_loss"))
    a2.set_title("(b) final loss", loc="left")
    C.seed_note(a2)
    fig.tight_layout()
    C.figure_legend(fig, a1, title=f"GPT recipe, {C.regime(runs.iloc[0])}")
    lo_lr, hi_lr = runs["lr"].min(), runs["lr"].max()

    def at(name: str, lr: float) -> float:
        return attn.get(name, {}).get(f"{lr:g}", {}).get("mean", np.nan)

    growth = at("no QK-norm", hi_lr) / at("no QK-norm", lo_lr)
    finding = (f"max attention logit without QK-norm {at('no QK-norm', lo_lr):.3g} -> "
               f"{at('no QK-norm', hi_lr):.3g} from LR {lo_lr:g} to {hi_lr:g} (x{growth:.0f}); "
               f"with it {at('QK-layernorm', lo_lr):.3g} -> {at('QK-layernorm', hi_lr):.3g}. "
               f"{_sens_finding(numbers, 'QK-layernorm', 'no QK-norm')}; QK-norm less "
               f"sensitive in {sens.wins}/{sens.n} seeds.")
    attn_ok = at("QK-layernorm", hi_lr) < at("no QK-norm", hi_lr) / 10 and growth > 10
    verdict = C.combine([sens.verdict, C.REPRODUCED if attn_ok else C.NOT])
    return C.FigureResult(
        fig, verdict, finding, numbers,
        _runs_json(runs, attn_logit_max=lambda r: float(r["attn_logit_max"])),
        {**{k: C.DEFINITIONS[k] for k in ("final_loss", "lr_sensitivity", "ci")},
         "attn_logit_max": "max over logged steps and layers of the largest pre-softmax "
                           "attention logit q.k/sqrt(d_head) (metrics.jsonl attn_logit_max); "
                           "geometric mean over seeds"})


# --- adam eps -------------------------------------------------------------------------------


def _eps_name(r: pd.Series) -> str:
    return f"eps {float(r['optim.eps']):.0e}".replace("e-0", "e-")


def adam_eps(data, scale: str) -> C.FigureResult:
    """Stability (LR sensitivity) and learning speed (loss at the best LR over steps)."""
    runs = _prepare(data, _eps_name)
    order = sorted(set(runs["variant"]), key=lambda n: float(n.split()[1]))
    colors = style.palette(order)
    numbers = C.lr_grid_numbers(runs)
    base, big = order[0], order[-1]
    sens = C.compare(_per_seed(numbers, "lr_sensitivity", big),
                     _per_seed(numbers, "lr_sensitivity", base))
    speed = C.compare(_per_seed(numbers, "best_final_loss", base),
                      _per_seed(numbers, "best_final_loss", big))
    numbers["stability_large_eps"] = sens.to_json()
    numbers["speed_small_eps"] = speed.to_json()
    # learning speed: loss curves at the LR that is best for the small eps (seed mean)
    fl = numbers["final_loss"][base]
    best_lr = float(min(fl, key=lambda k: fl[k]["mean"]))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=style.figsize("double", 0.36))
    C.plot_lr_grid(a1, runs, order, colors)
    C.init_line(a1, runs)
    a1.set_ylabel(style.label("final_loss"))
    a1.set_title("(a) stability: final loss over LRs", loc="left")
    at_best = runs[np.isclose(runs["lr"], best_lr)]
    C.plot_curves(a2, data.metrics, at_best, "loss", order, colors, smooth=9)
    a2.set_ylabel(style.label("loss"))
    a2.set_title(f"(b) learning speed at LR {best_lr:g}", loc="left")
    C.seed_note(a1)
    fig.tight_layout()
    C.figure_legend(fig, a1, title=f"Llama2 recipe, {C.regime(runs.iloc[0])}; Adam epsilon")
    numbers["speed_lr"] = best_lr
    s = numbers["lr_sensitivity"]
    finding = (f"best final loss {base} {C.fmt(speed.a)} vs {big} {C.fmt(speed.b)} "
               f"({base} lower in {speed.wins}/{speed.n} seeds); LR sensitivity "
               + ", ".join(f"{n} {C.fmt(s[n])}" for n in order) + " nats.")
    # Claim: large eps slows learning (and buys stability).
    verdict = speed.verdict
    return C.FigureResult(fig, verdict, finding, numbers,
                          _runs_json(runs, eps=lambda r: float(r["optim.eps"])),
                          {k: C.DEFINITIONS[k] for k in ("final_loss", "lr_sensitivity", "ci")})


# --- init std -------------------------------------------------------------------------------


def _init_name(r: pd.Series) -> str:
    emb = "scaled emb." if r["model.scaled_embedding"] else "plain emb."
    return f"std {float(r['model.init_std']):g}, {emb}"


def init_std(data, scale: str) -> C.FigureResult:
    runs = _prepare(data, _init_name)
    order = sorted(set(runs["variant"]), key=lambda n: (("scaled" in n), float(n.split()[1][:-1])))
    colors = style.palette(order)
    numbers = C.lr_grid_numbers(runs)
    s = numbers["lr_sensitivity"]
    gpt, llama = "std 0.005, plain emb.", "std 0.02, scaled emb."
    cmp = C.compare(_per_seed(numbers, "lr_sensitivity", llama),
                    _per_seed(numbers, "lr_sensitivity", gpt))
    alone = C.compare(_per_seed(numbers, "lr_sensitivity", "std 0.02, plain emb."),
                      _per_seed(numbers, "lr_sensitivity", gpt))
    numbers["llama2_init_vs_gpt_init"] = cmp.to_json()
    numbers["std_0.02_alone"] = alone.to_json()
    fig, ax = _grid_figure(runs, order, colors, width="double")
    C.seed_note(ax)
    finding = ("LR sensitivity " + ", ".join(f"{n}: {C.fmt(s[n])}" for n in order)
               + f" nats; 0.02 + scaled better than 0.005 plain in {cmp.wins}/{cmp.n} seeds, "
               f"0.02 alone in {alone.wins}/{alone.n}.")
    return C.FigureResult(fig, cmp.verdict, finding, numbers, _runs_json(
        runs, init_std=lambda r: float(r["model.init_std"]),
        scaled_embedding=lambda r: bool(r["model.scaled_embedding"])),
        {k: C.DEFINITIONS[k] for k in ("final_loss", "lr_sensitivity", "ci")})


# --- width scaling --------------------------------------------------------------------------


def width_scaling(data, scale: str) -> C.FigureResult:
    """Instability onset (max stable LR and LR sensitivity) against width, with and without
    QK-layernorm if the sweep has both."""
    runs = _prepare(data, lambda r: "QK-layernorm" if r["model.qk_layernorm"] else "no QK-norm")
    runs["width"] = runs["model.hidden_size"].astype(int)
    numbers = C.lr_grid_numbers(runs, by=["variant", "width"])
    order = [n for n in ("no QK-norm", "QK-layernorm") if n in set(runs["variant"])]
    colors = style.palette(order)
    widths = sorted(set(runs["width"]))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=style.figsize("double", 0.36))
    table = {}
    for name in order:
        ms, ss = [], []
        for w in widths:
            key = f"{name} / {w}"
            ms.append(numbers["max_stable_lr"].get(key))
            ss.append(numbers["lr_sensitivity"].get(key))
            table[key] = {"max_stable_lr": ms[-1], "lr_sensitivity": ss[-1]}
        for ax, vals in ((a1, ms), (a2, ss)):
            mean = [v["mean"] if v else np.nan for v in vals]
            lo = [v["lo"] if v and v["lo"] is not None else np.nan for v in vals]
            hi = [v["hi"] if v and v["hi"] is not None else np.nan for v in vals]
            yerr = np.array([np.subtract(mean, lo), np.subtract(hi, mean)])
            ax.errorbar(widths, mean, yerr=np.nan_to_num(np.abs(yerr)), marker="o",
                        color=colors[name], label=name, capsize=2)
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        ax.set_xlabel("Model width d (log scale)")
    top = float(runs["lr"].max())
    a1.axhline(top, color="0.5", linestyle=":", linewidth=0.8)
    a1.annotate("largest LR tried", (0.02, top), xycoords=("axes fraction", "data"),
                xytext=(0, -2), textcoords="offset points", va="top", fontsize=6, color="0.4")
    C.lr_ticks(a1, sorted(set(runs["lr"])), which="y")
    a1.set_ylabel("Max stable peak LR (log scale)")
    a2.set_ylabel(style.label("lr_sensitivity"))
    a1.set_title("(a) instability onset: largest LR not diverged", loc="left", fontsize=7)
    a2.set_title(f"(b) LR sensitivity, LRs {', '.join(f'{x:g}' for x in sorted(set(runs['lr'])))}",
                 loc="left", fontsize=7)
    fig.tight_layout()
    C.figure_legend(fig, a1, title=f"GPT recipe, {C.regime(runs.iloc[0])}, warmup "
                    f"{int(runs['optim.warmup_steps'].max())}; mean over seeds, whiskers: 95% CI")
    base = "no QK-norm" if "no QK-norm" in order else order[0]
    per_w = [_per_seed(numbers, "lr_sensitivity", f"{base} / {w}") for w in widths]
    # Claim: the onset LR falls (and LR sensitivity grows) with width: widest vs narrowest,
    # paired by seed. Testable only if some run diverged on the grid.
    grow = C.compare(per_w[0], per_w[-1])
    onset_w = [_per_seed(numbers, "max_stable_lr", f"{base} / {w}") for w in widths]
    onset_cmp = C.compare(onset_w[-1], onset_w[0], log=True)
    onset = [numbers["max_stable_lr"].get(f"{base} / {w}", {}).get("mean") for w in widths]
    numbers["narrow_vs_wide"] = grow.to_json()
    numbers["onset_wide_vs_narrow"] = onset_cmp.to_json()
    any_div = bool(runs[runs["variant"] == base]["diverged"].any())
    verdict = C.combine([onset_cmp.verdict, grow.verdict]) if any_div else C.NOT
    div = {f"d={w}": "{}/{}".format(int(g["diverged"].sum()), len(g))
           for w in widths for g in [runs[(runs["variant"] == base) & (runs["width"] == w)]]}
    numbers["diverged_runs_by_width"] = div
    finding = (f"{base}, {C.regime(runs.iloc[0])}: diverged runs " + ", ".join(
        f"{k} {v}" for k, v in div.items()) + "; max stable LR (geometric mean) " + ", ".join(
        f"d={w}: {o:.2g}" if o else f"d={w}: none" for w, o in zip(widths, onset, strict=True))
        + f" (wider lower in {onset_cmp.wins}/{onset_cmp.n} seeds); LR sensitivity " + ", ".join(
        f"d={w}: {C.fmt(C.stat_of(numbers, 'lr_sensitivity', f'{base} / {w}'))}" for w in widths)
        + f" nats (narrowest below widest in {grow.wins}/{grow.n} seeds).")
    if not any_div:
        finding += " No run diverged on the grid: the onset lies above it."
    return C.FigureResult(fig, verdict, finding, numbers,
                          _runs_json(runs, width=lambda r: int(r["width"]),
                                     grid=lambda r: f"{r['variant']} / {int(r['width'])}"),
                          {k: C.DEFINITIONS[k] for k in ("final_loss", "lr_sensitivity",
                                                         "max_stable_lr", "ci")})
