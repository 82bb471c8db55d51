"""Figures of LR-grid studies: held-out loss against peak LR, variants side by side, over seeds.

gpt_vs_llama2, norm_placement, qk_norm, adam_eps, init_std, width_scaling. Each compares arms
paired by seed (:func:`analysis.figures.common.compare`) and is testable only where every arm's
best run learns (:func:`analysis.figures.common.is_testable`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import style
from analysis.figures import common as C
from analysis.stats import seed_ci


def _seeds(numbers: Mapping, metric: str, name: str) -> pd.Series:
    """A grid metric's per-seed values of one arm (``numbers`` of ``C.lr_grid_numbers``)."""
    values = numbers[metric].get(name, {}).get("per_seed", {})
    return pd.Series({int(k): v for k, v in values.items()}, dtype=float)


def _runs_json(runs: pd.DataFrame, **columns: Callable[[pd.Series], object]) -> dict:
    return {r["run_id"]: C.per_run_entry(r, **{k: f(r) for k, f in columns.items()})
            for _, r in runs.iterrows()}


def _grid_panel(ax, runs: pd.DataFrame, order: Sequence[str], colors: Mapping[str, str]
                ) -> None:
    C.plot_lr_grid(ax, runs, order, colors)
    C.level_lines(ax, runs)
    ax.set_ylabel(style.label("eval_loss"))


def _sens(numbers: Mapping, *names: str) -> str:
    return ", ".join(f"{n} {C.fmt(C.stat_of(numbers, 'lr_sensitivity', n))}" for n in names)


def _best(numbers: Mapping, *names: str) -> str:
    return ", ".join(f"{n} {C.fmt(C.stat_of(numbers, 'best_eval_loss', n))}" for n in names)


def _seed_values(stat: Mapping, digits: int = 2) -> str:
    """The per-seed values of a statistic: ``(s1 0.41, s2 0.38, ...)``."""
    per = stat.get("per_seed", {})
    return "(" + ", ".join(f"s{k} {v:.{digits}f}" for k, v in per.items()) + ")"


def _test_text(name: str, test: C.Comparison | C.V.Test) -> str:
    t = test.test if isinstance(test, C.Comparison) else test
    p = "" if t.verdict == C.UNTESTABLE else f", p = {t.p:.3g}"
    return f"{name}: {t.verdict} ({t.detail}{p})"


def _levels_text(runs: pd.DataFrame, names: Sequence[str], column: str = "variant") -> str:
    lv = C.levels(runs)
    arms = C.arms_json(runs, names, column)
    return (f"Levels: unigram {lv['unigram']:.2f}, bigram {lv['bigram']:.2f}; best held-out "
            + ", ".join(f"{n} {a['best_eval_loss']:.2f} ({a['vs_bigram_nats']:+.2f} vs bigram)"
                        for n, a in arms.items()) + ".")


# --- gpt_vs_llama2 --------------------------------------------------------------------------


def _part(runs: pd.DataFrame, info: Mapping[str, Mapping] | None, part: str) -> pd.DataFrame:
    """The runs of one part of the study (all runs when there are no parts)."""
    if not info:
        return runs if part == "main" else runs.iloc[0:0]
    keep = runs["run_id"].map(lambda r: info.get(r, {}).get("part", "main") == part)
    return runs[keep.astype(bool)]


def gpt_vs_llama2(data, scale: str, info: Mapping[str, Mapping] | None = None
                  ) -> C.FigureResult:
    """(a) Held-out loss vs LR of both recipes as published, 5 seeds; (b) loss curves where
    the recipes separate (no clipping, LR-independent weight decay, LR 0.3). Tests: LR
    sensitivity and best held-out loss (paired by seed), and divergences where they separate
    (Fisher); an arm is a recipe, its best run its best in the study."""
    allruns = C.with_columns(data.runs, lambda r: str(r["recipe"]))
    main, sep = _part(allruns, info, "main"), _part(allruns, info, "separating")
    order = [n for n in ("gpt", "llama2") if n in set(allruns["variant"])]
    colors = style.palette(order)
    numbers = C.lr_grid_numbers(main)
    ok = C.is_testable(allruns, order)
    tests: dict[str, C.Comparison | C.V.Test] = {
        "lr_sensitivity_llama2_lower": C.compare(
            _seeds(numbers, "lr_sensitivity", "llama2"), _seeds(numbers, "lr_sensitivity", "gpt"),
            testable=ok),
        "best_eval_loss_llama2_lower": C.compare(
            _seeds(numbers, "best_eval_loss", "llama2"), _seeds(numbers, "best_eval_loss", "gpt"),
            testable=ok)}
    fig, axes = plt.subplots(1, 2 if len(sep) else 1, squeeze=False, figsize=style.figsize(
        "double" if len(sep) else "single", 0.36 if len(sep) else 0.8))
    axes = axes[0]
    _grid_panel(axes[0], main, order, colors)
    reg = C.regime(main.iloc[0]) if len(main) else ""
    axes[0].set_title(f"(a) recipes as published: {reg}", loc="left", fontsize=7)
    finding = (f"{reg}, 5 seeds: LR sensitivity {_sens(numbers, 'llama2', 'gpt')} nats; best "
               f"held-out loss {_best(numbers, 'llama2', 'gpt')}.")
    if len(sep):
        sreg = C.regime(sep.iloc[0])
        top = float(sep["lr"].max())
        tests["separating_gpt_diverges_more"] = C.count_test(sep, "gpt", "llama2", testable=ok)
        numbers["separating"] = {
            "lr": top, "regime": sreg,
            "eval_loss_capped": C.by_variant(sep.assign(c=C.capped(sep)), "c", order),
            "peak_loss": C.by_variant(sep, "peak_loss", order, log=True),
            "diverged_runs": {n: "{}/{}".format(int(g["diverged"].sum()), len(g))
                              for n in order for g in [sep[sep["variant"] == n]]}}
        C.curve_panel(axes[1], data.metrics, sep, "loss", order, colors,
                      "Training loss (nats/token, log scale)", f"(b) {sreg}, LR {top:g}",
                      log=True)
        C.level_lines(axes[1], sep)
        s = numbers["separating"]
        finding += (f" Where they separate ({sreg}, LR {top:g}): diverged "
                    + ", ".join(f"{n} {s['diverged_runs'][n]}" for n in order)
                    + "; held-out loss (capped at the unigram level) "
                    + ", ".join(f"{n} {C.fmt(s['eval_loss_capped'][n])}" for n in order)
                    + "; peak training loss " + ", ".join(
                        f"{n} {C.fmt(s['peak_loss'][n], 1)}" for n in order) + ".")
    finding += " " + "; ".join(_test_text(k, t) for k, t in tests.items()) + ". "
    finding += _levels_text(allruns, order)
    fig.tight_layout()
    C.figure_legend(fig, axes[0])
    C.seed_note(axes[0])
    return C.result(fig, tests, finding, numbers, _runs_json(allruns),
                    C.definitions("eval_loss", "lr_sensitivity", "max_stable_lr", "diverged"),
                    allruns, dict.fromkeys(tests, order), C.grid_json(main, numbers))


# --- norm placement -------------------------------------------------------------------------


def norm_placement(data, scale: str) -> C.FigureResult:
    """Pre-LN against post-LN without warmup: LR sensitivity, paired by seed."""
    runs = C.with_columns(data.runs, lambda r: f"{r['model.norm_position']}-LN")
    order = [n for n in ("pre-LN", "post-LN", "sandwich-LN") if n in set(runs["variant"])]
    numbers = C.lr_grid_numbers(runs)
    arms = ["pre-LN", "post-LN"]
    tests = {"lr_sensitivity_pre_lower": C.compare(
        _seeds(numbers, "lr_sensitivity", "pre-LN"), _seeds(numbers, "lr_sensitivity", "post-LN"),
        testable=C.is_testable(runs, arms))}
    fig, ax = plt.subplots(figsize=style.figsize("single", 0.8))
    _grid_panel(ax, runs, order, style.palette(order))
    fig.tight_layout()
    warm = int(runs["optim.warmup_steps"].max()) if len(runs) else 0
    C.figure_legend(fig, ax, title=f"GPT recipe, {C.regime(runs.iloc[0])}, warmup {warm}")
    C.seed_note(ax)
    div = {n: "{}/{}".format(int(g["diverged"].sum()), len(g))
           for n in order for g in [runs[runs["variant"] == n]]}
    numbers["diverged_runs_total"] = div
    finding = (f"Warmup {warm}: LR sensitivity {_sens(numbers, *order)} nats "
               + "; ".join(f"{n} {_seed_values(numbers['lr_sensitivity'][n])}" for n in order)
               + "; diverged runs " + ", ".join(f"{n} {v}" for n, v in div.items())
               + f"; best held-out loss {_best(numbers, *order)}. "
               + _test_text("pre-LN less sensitive", tests["lr_sensitivity_pre_lower"]) + ". "
               + _levels_text(runs, arms))
    return C.result(fig, tests, finding, numbers, _runs_json(runs),
                    C.definitions("eval_loss", "lr_sensitivity", "diverged"), runs,
                    dict.fromkeys(tests, arms), C.grid_json(runs, numbers))


# --- qk_norm --------------------------------------------------------------------------------


def _qk_name(r: pd.Series) -> str:
    return "QK-layernorm" if r["model.qk_layernorm"] else "no QK-norm"


def qk_norm(data, scale: str) -> C.FigureResult:
    """(a) Max attention logit against LR (the mechanism, not the verdict: with layernormed q
    and k it is bounded by construction); (b) held-out loss against LR. Verdict: LR
    sensitivity, paired by seed."""
    runs = C.with_columns(data.runs, _qk_name)
    runs["attn_logit_max"] = C.reduce_metric(runs, data.metrics, "attn_logit_max", "max")
    order = [n for n in ("no QK-norm", "QK-layernorm") if n in set(runs["variant"])]
    colors = style.palette(order)
    numbers = C.lr_grid_numbers(runs)
    tests = {"lr_sensitivity_qk_lower": C.compare(
        _seeds(numbers, "lr_sensitivity", "QK-layernorm"),
        _seeds(numbers, "lr_sensitivity", "no QK-norm"), testable=C.is_testable(runs, order))}
    attn = {name: {f"{lr:g}": C.stat_dict(seed_ci(gg["attn_logit_max"], log=True),
                                           dict(zip(gg["seed"], gg["attn_logit_max"],
                                                    strict=True)))
                   for lr, gg in g.groupby("lr")} for name, g in runs.groupby("variant")}
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
    a1.set_title("(a) attention logits (mechanism)", loc="left")
    _grid_panel(a2, runs, order, colors)
    a2.set_title("(b) held-out loss", loc="left")
    C.seed_note(a2)
    fig.tight_layout()
    C.figure_legend(fig, a1, title=f"Llama2 recipe, {C.regime(runs.iloc[0])}")
    lo_lr, hi_lr = runs["lr"].min(), runs["lr"].max()

    def at(name: str, lr: float) -> float:
        return attn.get(name, {}).get(f"{lr:g}", {}).get("mean", np.nan)

    finding = (f"LR sensitivity {_sens(numbers, *order)} nats "
               + "; ".join(f"{n} {_seed_values(numbers['lr_sensitivity'][n])}" for n in order)
               + f"; best held-out loss {_best(numbers, *order)}. Max attention logit from LR "
               f"{lo_lr:g} to {hi_lr:g}: without QK-norm {at('no QK-norm', lo_lr):.3g} -> "
               f"{at('no QK-norm', hi_lr):.3g}, with it {at('QK-layernorm', lo_lr):.3g} -> "
               f"{at('QK-layernorm', hi_lr):.3g} (bounded by construction with it, so not "
               "part of the verdict). "
               + _test_text("QK-norm less sensitive", tests["lr_sensitivity_qk_lower"]) + ". "
               + _levels_text(runs, order))
    return C.result(
        fig, tests, finding, numbers,
        _runs_json(runs, attn_logit_max=lambda r: float(r["attn_logit_max"])),
        C.definitions("eval_loss", "lr_sensitivity", attn_logit_max=(
            "max over logged steps and layers of the largest pre-softmax attention logit "
            "q.k/sqrt(d_head) (metrics.jsonl attn_logit_max; sampled rows); geometric mean "
            "over seeds. With layernormed q and k it stays near sqrt(d_head) times the norms' "
            "gains by construction: shown as the mechanism, not tested")),
        runs, dict.fromkeys(tests, order), C.grid_json(runs, numbers))


# --- adam eps -------------------------------------------------------------------------------


def _eps_name(r: pd.Series) -> str:
    eps = f"eps {float(r['optim.eps']):.0e}".replace("e-0", "e-")
    scale = float(r.get("loss.scale", 1.0))
    return eps if scale == 1 else f"{eps}, loss x{scale:g}"


def adam_eps(data, scale: str) -> C.FigureResult:
    """Learning speed with Adam eps 1e-8 against 1e-5: with ordinary gradients and with the
    loss (so every gradient) scaled down. Adam is invariant to the loss scale except through
    eps, so the scaled arm emulates the small gradients of a large model; the claim is that
    there eps 1e-5 slows learning."""
    runs = C.with_columns(data.runs, _eps_name)
    runs["loss_scale"] = [float(r.get("loss.scale", 1.0)) for _, r in runs.iterrows()]
    runs["v_below_eps"] = C.reduce_metric(runs, data.metrics, "adam_v_below_eps", "mean",
                                          last_fraction=0.5)
    scales = sorted(set(runs["loss_scale"]))
    small = min(scales)
    name = {(e, s): _eps_name(pd.Series({"optim.eps": e, "loss.scale": s}))
            for e in (1e-8, 1e-5) for s in scales}
    order = [name[e, s] for s in sorted(scales, reverse=True) for e in (1e-8, 1e-5)
             if name[e, s] in set(runs["variant"])]
    colors = style.palette(order)
    held = runs.assign(c=C.capped(runs))
    numbers = {"eval_loss_capped": C.by_variant(held, "c", order),
               "adam_v_below_eps": C.by_variant(runs, "v_below_eps", order),
               "lr": float(runs["lr"].iloc[0]) if len(runs) else None}
    tests: dict[str, C.Comparison] = {}
    for s in scales:
        a, b = name[1e-8, s], name[1e-5, s]
        test = C.compare(C.per_seed(held, "c", a), C.per_seed(held, "c", b),
                         testable=C.is_testable(runs, [a, b]))
        key = "scaled_eps_1e-8_lower" if s == small and s != 1 else "control_eps_1e-8_lower"
        numbers[key] = test.to_json()
        if s == small and s != 1:
            tests[key] = test  # the claim: tiny gradients; scale 1 is the control
    fig, (a1, a2) = plt.subplots(1, 2, figsize=style.figsize("double", 0.36))
    C.plot_curves(a1, data.metrics, runs, "loss", order, colors, smooth=9)
    C.level_lines(a1, runs)
    a1.set_ylabel(style.label("loss"))
    a1.set_title(f"(a) training loss, LR {numbers['lr']:g}", loc="left")
    for i, n in enumerate(order):
        g = runs[runs["variant"] == n]
        a2.bar(i, np.nanmean(g["v_below_eps"]), 0.7, color=colors[n])
        a2.scatter(np.full(len(g), i), g["v_below_eps"], s=5, color="0.2", zorder=3)
    a2.set_xticks(np.arange(len(order)), order, rotation=20, ha="right", fontsize=6)
    a2.set_ylabel("Fraction of Adam's v below eps²\n(mean over the second half)")
    a2.set_title("(b) where eps dominates the update", loc="left")
    fig.tight_layout()
    C.figure_legend(fig, a1, title=f"Llama2 recipe, {C.regime(runs.iloc[0])}; Adam epsilon, "
                    "loss scale", ncol=2)
    e = numbers["eval_loss_capped"]
    v = numbers["adam_v_below_eps"]
    finding = ("Held-out loss " + ", ".join(f"{n} {C.fmt(e[n])} {_seed_values(e[n])}"
                                            for n in order)
               + "; fraction of v below eps² " + ", ".join(f"{n} {C.fmt(v[n], 3)}"
                                                           for n in order) + ". "
               + "; ".join(_test_text(k, t)
                           for k, t in tests.items())
               + f"; control at loss scale 1: {numbers['control_eps_1e-8_lower']['verdict']} "
                 f"(p = {numbers['control_eps_1e-8_lower']['p']:.3g}). "
               + _levels_text(runs, order))
    return C.result(fig, tests, finding, numbers, _runs_json(
        runs, eps=lambda r: float(r["optim.eps"]), loss_scale=lambda r: float(r["loss_scale"]),
        adam_v_below_eps=lambda r: float(r["v_below_eps"])),
        C.definitions("eval_loss", adam_v_below_eps=(
            "metrics.jsonl adam_v_below_eps: the fraction of Adam's second-moment entries "
            "below eps^2 (where eps, not the gradient, sets the update's size), mean over "
            "the logged steps of the run's second half")),
        runs, {k: [name[1e-8, small], name[1e-5, small]] for k in tests}, C.grid_json(runs))


# --- init std -------------------------------------------------------------------------------


def _init_name(r: pd.Series) -> str:
    emb = "×√d" if r["model.scaled_embedding"] else "plain"
    if r.get("model.embedding_layernorm", False):
        emb = "LN" if emb == "plain" else emb + " + LN"
    return f"std {float(r['model.init_std']):g}, {emb}"


def init_std(data, scale: str) -> C.FigureResult:
    """Init std 0.005 against 0.02, embeddings plain or scaled by sqrt(d), at a moderate LR:
    the grad-norm spike and the held-out loss per variant. Verdict: GPT's init (0.005, plain)
    against Llama2's (0.02, x sqrt(d)) on the grad-norm spike, paired by seed."""
    runs = C.spike_columns(C.with_columns(data.runs, _init_name), data.metrics)
    runs = runs[~runs["model.embedding_layernorm"].astype(bool)] if (
        "model.embedding_layernorm" in runs) else runs
    order = [n for n in ("std 0.005, plain", "std 0.02, plain", "std 0.005, ×√d",
                         "std 0.02, ×√d") if n in set(runs["variant"])]
    colors = style.palette(order)
    gpt, llama = "std 0.005, plain", "std 0.02, ×√d"
    tests = {"grad_norm_spike_llama2_init_lower": C.compare(
        C.per_seed(runs, "gn_spike", llama), C.per_seed(runs, "gn_spike", gpt),
        testable=C.is_testable(runs, [gpt, llama]))}
    held = runs.assign(c=C.capped(runs))
    numbers = {"lr": float(runs["lr"].iloc[0]) if len(runs) else None,
               "grad_norm_spike": C.by_variant(runs, "gn_spike", order),
               "grad_norm_peak": C.by_variant(runs, "gn_peak", order, log=True),
               "loss_spikes": C.by_variant(runs, "loss_spikes", order),
               "embedding_std_start": C.by_variant(runs, "emb_std_start", order, log=True),
               "embedding_std_end": C.by_variant(runs, "emb_std_end", order, log=True),
               "eval_loss_capped": C.by_variant(held, "c", order)}
    learn = C.compare(C.per_seed(held, "c", llama), C.per_seed(held, "c", gpt),
                      testable=C.is_testable(runs, [gpt, llama]))
    numbers["eval_loss_llama2_init_lower"] = learn.to_json()  # reported, not the claim
    fig, axes = plt.subplots(1, 3, figsize=style.figsize("double", 0.34),
                             gridspec_kw={"width_ratios": [1.2, 1.2, 0.9]})
    C.curve_panel(axes[0], data.metrics, runs, "grad_norm", order, colors,
                  "Gradient norm\n(L2, log scale)", f"(a) gradient norm, LR {numbers['lr']:g}",
                  log=True)
    C.curve_panel(axes[1], data.metrics, runs, "embedding_std", order, colors,
                  "Embedding std\n(per element, log)", "(b) embedding scale", log=True)
    C.held_out_panel(axes[2], runs, order, colors, held, "(c) held-out loss")
    fig.tight_layout()
    C.figure_legend(fig, axes[0], title=f"GPT recipe, {C.regime(runs.iloc[0])}; init std, "
                    "embeddings", ncol=4)
    g, es = numbers["grad_norm_spike"], numbers["embedding_std_start"]
    finding = (f"LR {numbers['lr']:g}: grad-norm spike log10(max/median) "
               + ", ".join(f"{n} {C.fmt(g[n])} {_seed_values(g[n])}" for n in order)
               + "; embedding std at step 1 " + ", ".join(f"{n} {C.fmt(es[n], sci=True)}"
                                                           for n in order)
               + "; held-out loss " + ", ".join(
                   f"{n} {C.fmt(numbers['eval_loss_capped'][n])}" for n in order)
               + f" (Llama2's init lower in {learn.wins}/{learn.n} seeds, p = "
                 f"{learn.test.p:.3g}). "
               + _test_text("Llama2's init spikes less", tests[
                   "grad_norm_spike_llama2_init_lower"]) + ". "
               + _levels_text(runs, [gpt, llama]))
    return C.result(fig, tests, finding, numbers, _runs_json(
        runs, init_std=lambda r: float(r["model.init_std"]),
        scaled_embedding=lambda r: bool(r["model.scaled_embedding"]),
        grad_norm_spike=lambda r: float(r["gn_spike"]), loss_spikes=lambda r: int(
            r["loss_spikes"]), embedding_std_start=lambda r: float(r["emb_std_start"])),
        C.definitions("eval_loss", **C.SPIKE_DEFS), runs, dict.fromkeys(tests, [gpt, llama]),
        C.grid_json(runs))


# --- width scaling --------------------------------------------------------------------------


def width_scaling(data, scale: str) -> C.FigureResult:
    """LR sensitivity against width, with and without QK-layernorm. Tests: without QK-norm the
    widest is more sensitive than the narrowest; with QK-norm the growth is smaller (paired by
    seed)."""
    runs = C.with_columns(data.runs, _qk_name)
    runs["width"] = runs["model.hidden_size"].astype(int)
    runs["arm"] = [f"{v} / {w}" for v, w in zip(runs["variant"], runs["width"], strict=True)]
    numbers = C.lr_grid_numbers(runs, by=["variant", "width"])
    order = [n for n in ("no QK-norm", "QK-layernorm") if n in set(runs["variant"])]
    colors = style.palette(order)
    widths = sorted(set(runs["width"]))
    arms = [f"{v} / {w}" for v in order for w in widths]
    ok = C.is_testable(runs, arms, column="arm")
    narrow, wide = widths[0], widths[-1]

    def sens(v: str, w: int) -> pd.Series:
        return _seeds(numbers, "lr_sensitivity", f"{v} / {w}")

    growth = {v: (sens(v, wide) - sens(v, narrow)).dropna() for v in order}
    no_qk = [f"no QK-norm / {w}" for w in (narrow, wide)]
    tests: dict[str, C.Comparison] = {
        "no_qk_wider_more_sensitive": C.compare(
            sens("no QK-norm", narrow), sens("no QK-norm", wide),
            testable=C.is_testable(runs, no_qk, column="arm"))}
    test_arms = {"no_qk_wider_more_sensitive": no_qk}
    if len(order) == 2:
        tests["qk_smaller_growth"] = C.compare(growth["QK-layernorm"], growth["no QK-norm"],
                                               testable=ok)
        test_arms["qk_smaller_growth"] = arms
    numbers["growth_wide_minus_narrow"] = {
        v: C.stat_dict(seed_ci(growth[v]), growth[v]) for v in order}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=style.figsize("double", 0.36))
    for name in order:
        ss = [numbers["lr_sensitivity"].get(f"{name} / {w}") for w in widths]
        mean = np.array([v["mean"] if v else np.nan for v in ss])
        lo = np.array([v["lo"] if v and np.isfinite(v["lo"]) else m for v, m in zip(ss, mean,
                                                                                     strict=True)])
        hi = np.array([v["hi"] if v and np.isfinite(v["hi"]) else m for v, m in zip(ss, mean,
                                                                                     strict=True)])
        a1.errorbar(widths, mean, yerr=np.abs([mean - lo, hi - mean]), marker="o",
                    color=colors[name], label=name, capsize=2)
        for w, v in zip(widths, ss, strict=True):
            seeds = list((v or {}).get("per_seed", {}).values())
            a1.scatter(np.full(len(seeds), w), seeds, s=5, color=colors[name], alpha=0.5)
    a1.set_xscale("log", base=2)
    a1.set_xticks(widths, [str(w) for w in widths])
    a1.minorticks_off()
    a1.set_xlabel("Model width d (log scale)")
    a1.set_ylabel(style.label("lr_sensitivity"))
    a1.set_title("(a) LR sensitivity against width", loc="left", fontsize=7)
    widest = runs[runs["width"] == wide]
    _grid_panel(a2, widest, order, colors)
    a2.set_title(f"(b) held-out loss at d={wide}", loc="left", fontsize=7)
    fig.tight_layout()
    C.figure_legend(fig, a1, title=f"Llama2 recipe, {C.regime(runs.iloc[0])}; mean over seeds, "
                    "whiskers: 95% t-interval, dots: seeds")
    finding = ("LR sensitivity " + "; ".join(
        f"{v}: " + ", ".join(f"d={w} {C.fmt(C.stat_of(numbers, 'lr_sensitivity', f'{v} / {w}'))}"
                             for w in widths) for v in order)
        + " nats; growth from d=" + f"{narrow} to d={wide}: " + ", ".join(
            f"{v} {C.fmt(numbers['growth_wide_minus_narrow'][v])} "
            f"{_seed_values(numbers['growth_wide_minus_narrow'][v])}" for v in order) + ". "
        + "; ".join(_test_text(k, t) for k, t in tests.items()) + ". "
        + _levels_text(runs, arms, column="arm"))
    return C.result(fig, tests, finding, numbers,
                    _runs_json(runs, width=lambda r: int(r["width"]),
                               grid=lambda r: r["arm"]),
                    C.definitions("eval_loss", "lr_sensitivity", "max_stable_lr"), runs,
                    test_arms, C.grid_json(runs, numbers), column="arm")
