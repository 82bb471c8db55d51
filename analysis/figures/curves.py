"""Figures of training dynamics over steps: z_loss and spike_no_more."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import metrics as M
from analysis import style
from analysis.figures import common as C
from analysis.stats import seed_ci


def _reduce(runs: pd.DataFrame, metrics: pd.DataFrame, key: str, agg: str,
            max_step: int | None = None) -> pd.Series:
    """Per-run reduction of a logged metric (optionally up to a step), aligned with runs."""
    if key not in metrics:
        return pd.Series(np.nan, index=runs.index)
    m = metrics[["run_id", "step", key]].dropna()
    if max_step is not None:
        m = m[m["step"] <= max_step]
    return runs["run_id"].map(m.groupby("run_id")[key].agg(agg))


def _loss_spikes(metrics: pd.DataFrame) -> dict[str, int]:
    out = {}
    for rid, m in metrics.groupby("run_id", sort=False):
        loss = m["loss"].to_numpy(dtype=float)
        out[rid] = len(M.merge_incidents(m["step"].to_numpy()[M.loss_spike_steps(loss)]))
    return out


def _by_variant(runs: pd.DataFrame, column: str, order: list[str], log: bool = False) -> dict:
    return {name: C.stat_dict(seed_ci(g[column], log=log), dict(zip(g["seed"], g[column],
                                                                     strict=True)))
            for name in order for g in [runs[runs["variant"] == name]] if len(g)}


def _paired(runs: pd.DataFrame, column: str, a: str, b: str, lower_is_better: bool = True
            ) -> C.Comparison:
    ga = runs[runs["variant"] == a].groupby("seed")[column].mean()
    gb = runs[runs["variant"] == b].groupby("seed")[column].mean()
    return C.compare(ga, gb, lower_is_better)


def _diverged_verdict(runs: pd.DataFrame, treated: str, control: str) -> tuple[str, str]:
    """Does the treatment prevent divergence? Not testable when the control never diverged."""
    nc = int(runs.loc[runs["variant"] == control, "diverged"].sum())
    nt = int(runs.loc[runs["variant"] == treated, "diverged"].sum())
    n = int((runs["variant"] == control).sum())
    text = f"diverged {control} {nc}/{n}, {treated} {nt}/{int((runs['variant'] == treated).sum())}"
    if nc == 0 or nt >= nc:
        return C.NOT, text
    return (C.REPRODUCED if nt == 0 else C.PARTLY), text


# --- z-loss ---------------------------------------------------------------------------------


def _z_name(r: pd.Series) -> str:
    z = float(r["loss.z_loss"])
    return "no z-loss" if z == 0 else f"z-loss {z:.0e}".replace("e-0", "e-")


DRIFT = 2.0
"""A run's output logits drifted when its peak logsumexp exceeds DRIFT x its loss at init
(ln V for a uniform start): only there can z-loss prevent anything."""


def z_loss(data, scale: str) -> C.FigureResult:
    """logsumexp of the output logits and max |logit| over steps, with and without z-loss, one
    row per (regime, LR); the verdict looks only where the runs without z-loss drift."""
    runs = C.with_columns(data.runs, _z_name)
    runs["regime"] = [C.regime(r) for _, r in runs.iterrows()]
    order = sorted(set(runs["variant"]), key=lambda n: 0.0 if n == "no z-loss"
                   else float(n.split()[1]))
    colors = style.palette(order)
    runs["lse_peak"] = _reduce(runs, data.metrics, "logsumexp_mean", "max")
    runs["lse_abs_mean"] = runs["run_id"].map(
        data.metrics.assign(a=data.metrics["logsumexp_mean"].abs()).groupby("run_id")["a"].mean())
    runs["logit_peak"] = _reduce(runs, data.metrics, "logit_max_abs", "max")
    cells = sorted({(r, lr) for r, lr in zip(runs["regime"], runs["lr"], strict=True)},
                   key=lambda c: (-c[1], c[0]))
    fig, axes = plt.subplots(len(cells), 2, figsize=style.figsize("double", 0.33 * len(cells)),
                             squeeze=False)
    letters = "abcdefghij"
    for i, (reg, lr) in enumerate(cells):
        at = runs[(runs["regime"] == reg) & np.isclose(runs["lr"], lr)]
        C.plot_curves(axes[i, 0], data.metrics, at, "logsumexp_mean", order, colors)
        C.plot_curves(axes[i, 1], data.metrics, at, "logit_max_abs", order, colors)
        axes[i, 0].set_ylabel("Output logsumexp\n(mean over tokens, nats)")
        axes[i, 1].set_ylabel("Max |output logit|\n(log scale)")
        C.log_axis(axes[i, 1])
        for j, what in enumerate(("logsumexp", "max |logit|")):
            axes[i, j].set_title(f"({letters[2 * i + j]}) {what}: peak LR {lr:g}, {reg}",
                                 loc="left", fontsize=7)
    fig.tight_layout()
    C.figure_legend(fig, axes[0, 0])
    control = "no z-loss"
    treated = next((n for n in order if n != control), control)
    numbers: dict = {"cells": {}, "drift_threshold": f"peak logsumexp > {DRIFT:g} x loss at init"}
    verdicts, texts = [], []
    for reg, lr in cells:
        at = runs[(runs["regime"] == reg) & np.isclose(runs["lr"], lr)]
        ctrl = at[at["variant"] == control]
        drift = int((ctrl["lse_peak"] > DRIFT * ctrl["loss_at_init"]).sum())
        lse = _paired(at, "lse_abs_mean", treated, control)
        logit = _paired(at, "logit_peak", treated, control)
        div_v, div_t = _diverged_verdict(at, treated, control)
        key = f"{reg}, LR {lr:g}"
        cell = {
            "regime": reg, "lr": lr, "control_runs_drifting": f"{drift}/{len(ctrl)}",
            "logsumexp_peak": _by_variant(at, "lse_peak", order),
            "logsumexp_abs_mean": _by_variant(at, "lse_abs_mean", order),
            "logit_max_abs_peak": _by_variant(at, "logit_peak", order, log=True),
            "final_loss": _by_variant(at.assign(f=C.capped_final(at)), "f", order),
            "lse_closer_to_zero": lse.to_json(), "logit_peak_lower": logit.to_json(),
            "divergence": {"verdict": div_v, "text": div_t}}
        numbers["cells"][key] = cell
        texts.append(
            f"{key}: logits drifted in {drift}/{len(ctrl)} runs without z-loss; mean absolute "
            f"logsumexp {C.fmt(cell['logsumexp_abs_mean'][control], 1)} without vs "
            f"{C.fmt(cell['logsumexp_abs_mean'][treated], 1)} with ({treated} closer to 0 in "
            f"{lse.wins}/{lse.n} seeds); {div_t}")
        if drift:  # only where there is a drift to prevent
            verdicts.append(C.combine([lse.verdict, div_v]))
    verdict = C.combine(verdicts) if verdicts else C.NOT
    numbers["tested_cells"] = len(verdicts)
    run_json = {r["run_id"]: C.per_run_entry(
        r, z_loss=float(r["loss.z_loss"]), regime=r["regime"], logsumexp_peak=float(r["lse_peak"]),
        logsumexp_abs_mean=float(r["lse_abs_mean"]), logit_max_abs_peak=float(r["logit_peak"]))
        for _, r in runs.iterrows()}
    return C.FigureResult(fig, verdict, "; ".join(texts) + ".", numbers, run_json, {
        **{k: C.DEFINITIONS[k] for k in ("final_loss", "diverged", "ci")},
        "logsumexp_abs_mean": "mean over logged steps of |logsumexp_mean| (metrics.jsonl: the "
                              "mean over tokens of logsumexp of the output logits)",
        "logit_max_abs_peak": "max over steps of metrics.jsonl logit_max_abs (geometric mean "
                              "over seeds)",
        "drift": f"a run without z-loss whose peak logsumexp exceeds {DRIFT:g} x its loss at "
                 "init; the verdict uses only (regime, LR) cells with such runs"})


# --- Spike No More --------------------------------------------------------------------------


def _emb_name(r: pd.Series) -> str:
    if r["model.embedding_layernorm"] and r["model.scaled_embedding"]:
        return "×√d + LN"
    if r["model.embedding_layernorm"]:
        return "LN"
    if r["model.scaled_embedding"]:
        return "×√d"
    return "plain"


SHORT = {"plain": "plain", "×√d": "×√d", "LN": "LN", "×√d + LN": "×√d + LN"}
"""Embedding variants: plain, scaled by sqrt(d), layernormed (LN), both."""


def _spike_row(axes, data, runs: pd.DataFrame, order: list[str], colors: dict[str, str],
               letters: str, lr: float) -> None:
    a1, a2, a3 = axes
    C.plot_curves(a1, data.metrics, runs, "loss", order, colors)
    C.log_axis(a1)
    a1.set_ylabel("Training loss\n(nats/token, log scale)")
    a1.set_title(f"({letters[0]}) training loss, peak LR {lr:g}", loc="left", fontsize=7)
    C.plot_curves(a2, data.metrics, runs, "grad_norm", order, colors)
    C.log_axis(a2)
    a2.set_ylabel("Gradient norm\n(L2, log scale)")
    a2.set_title(f"({letters[1]}) gradient norm, peak LR {lr:g}", loc="left", fontsize=7)
    for i, name in enumerate(order):
        g = runs[runs["variant"] == name]
        inc = g["num_spikes"].to_numpy(float)
        div = g["diverged"].to_numpy(float)
        a3.bar(i - 0.2, inc.mean(), 0.38, color=colors[name])
        a3.bar(i + 0.2, div.sum(), 0.38, color=colors[name], alpha=0.45, hatch="///",
               edgecolor="white", linewidth=0)
        a3.scatter(np.full(len(inc), i - 0.2), inc, s=5, color="0.2", zorder=3)
    a3.set_xticks(np.arange(len(order)), [SHORT.get(n, n) for n in order], fontsize=6,
                  rotation=30, ha="right")
    a3.set_ylabel("Count")
    a3.set_title(f"({letters[2]}) solid: detector incidents\nper run (dots: seeds); "
                 "hatched:\ndiverged runs", loc="left", fontsize=6)


def spike_no_more(data, scale: str) -> C.FigureResult:
    """Loss and grad norm over steps for plain, scaled and layernormed embeddings, with the
    spike incidents and diverged runs per variant; one row per peak LR."""
    runs = C.with_columns(data.runs, _emb_name)
    known = ["plain", "×√d", "LN", "×√d + LN"]
    order = [n for n in known if n in set(runs["variant"])]
    colors = style.palette(order)
    spikes = _loss_spikes(data.metrics)
    runs["loss_spikes"] = runs["run_id"].map(spikes).fillna(0).astype(int)
    runs["gn_peak"] = _reduce(runs, data.metrics, "grad_norm", "max")
    first = data.metrics.dropna(subset=["grad_norm"]).groupby("run_id")["grad_norm"].first()
    runs["gn_first"] = runs["run_id"].map(first)
    warm = int(np.nanmax(runs["optim.warmup_steps"].to_numpy(float)))
    lrs = sorted(set(runs["lr"]))
    fig = plt.figure(figsize=style.figsize("double", 0.36 * len(lrs)))
    grid = fig.add_gridspec(len(lrs), 3, width_ratios=[1.0, 1.0, 0.7])
    letters = "abcdefghi"
    for i, lr in enumerate(lrs):
        axes = [fig.add_subplot(grid[i, j]) for j in range(3)]
        _spike_row(axes, data, runs[np.isclose(runs["lr"], lr)], order, colors,
                   letters[3 * i:3 * i + 3], lr)
        if i == 0:
            first_ax = axes[0]
    fig.tight_layout()
    reg = C.regime(runs.iloc[0]) if len(runs) else ""
    C.figure_legend(fig, first_ax, title=f"GPT recipe, warmup {warm} steps, {reg}; embeddings "
                    "plain, scaled by √d, layernormed (LN), both; thin: seeds, thick: median")
    numbers: dict = {"warmup_steps": warm, "regime": reg, "by_lr": {}}
    verdicts, texts = [], []
    main = "×√d"
    for lr in lrs:
        at = runs[np.isclose(runs["lr"], lr)]
        cell = {
            "grad_norm_peak": _by_variant(at, "gn_peak", order, log=True),
            "spike_incidents": _by_variant(at, "num_spikes", order),
            "loss_spikes": _by_variant(at, "loss_spikes", order),
            "final_loss": _by_variant(at.assign(f=C.capped_final(at)), "f", order),
            "diverged": {n: "{}/{}".format(int(at.loc[at["variant"] == n, "diverged"].sum()),
                                           int((at["variant"] == n).sum())) for n in order}}
        # Testable where the plain runs spiked (grad-norm peak >= 10x its first value) or
        # diverged. Where they diverged, the treatment must prevent divergence; else it must
        # lower the grad-norm peak.
        van = at[at["variant"] == "plain"]
        diverged = bool(van["diverged"].any())
        spiky = diverged or bool((van["gn_peak"] >= 10 * van["gn_first"]).any())
        cell["plain_spiky"] = spiky
        cell["vs_plain"] = {}
        for name in order[1:]:
            peak = _paired(at, "gn_peak", name, "plain")
            div_v, div_t = _diverged_verdict(at, name, "plain")
            v = (div_v if diverged else peak.verdict) if spiky else C.NOT
            cell["vs_plain"][name] = {"grad_norm_peak_lower": peak.to_json(),
                                        "divergence": div_t, "verdict": v}
        numbers["by_lr"][f"{lr:g}"] = cell
        if spiky and main in cell["vs_plain"]:
            verdicts.append(cell["vs_plain"][main]["verdict"])
        g = cell["grad_norm_peak"]
        texts.append(
            f"LR {lr:g}: diverged " + ", ".join(f"{SHORT[n]} {cell['diverged'][n]}"
                                                for n in order)
            + "; peak grad norm " + ", ".join(f"{SHORT[n]} {C.fmt(g[n], 0)}" for n in order)
            + "; detector incidents per run " + ", ".join(
                f"{SHORT[n]} {C.fmt(cell['spike_incidents'][n], 1)}" for n in order))
    finding = f"{reg}, warmup {warm}: " + "; ".join(texts) + "."
    if not verdicts:
        finding += " The plain-embedding runs did not spike: nothing to prevent here."
    verdict = C.combine(verdicts) if verdicts else C.NOT
    run_json = {r["run_id"]: C.per_run_entry(
        r, loss_spikes=int(r["loss_spikes"]), grad_norm_peak=float(r["gn_peak"]),
        scaled_embedding=bool(r["model.scaled_embedding"]),
        embedding_layernorm=bool(r["model.embedding_layernorm"]))
        for _, r in runs.iterrows()}
    return C.FigureResult(fig, verdict, finding, numbers, run_json, {
        **{k: C.DEFINITIONS[k] for k in ("spike_incidents", "loss_spikes", "diverged", "ci")},
        "grad_norm_peak": "max grad norm over the run (geometric mean over seeds); the claim is "
                          "tested only at LRs where a plain-embedding run spiked (peak >= 10x "
                          "its first grad norm) or diverged: there the scaled embedding must "
                          "prevent divergence (or, without divergence, lower the peak)"})
