"""Figures of training dynamics over steps: z_loss and spike_no_more."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import style
from analysis.figures import common as C
from analysis.figures.lr_grid import _init_name, _levels_text, _runs_json, _seed_values, _test_text

# --- z-loss ---------------------------------------------------------------------------------


def _z_name(r: pd.Series) -> str:
    z = float(r["loss.z_loss"])
    return "no z-loss" if z == 0 else f"z-loss {z:.0e}".replace("e-0", "e-")


def _divergence_test(runs: pd.DataFrame, worse: str, better: str, testable: bool) -> C.V.Test:
    """Fisher's test that ``better`` diverges less than ``worse``; untestable when no run of
    ``worse`` diverged (there was nothing to prevent)."""
    n = int((runs["variant"] == worse).sum())
    k = int(runs.loc[runs["variant"] == worse, "diverged"].sum())
    if k == 0:
        m = int((runs["variant"] == better).sum())
        return C.V.Test(C.UNTESTABLE, float("nan"), n + m,
                        f"no run of {worse} diverged (0/{n}): nothing to prevent", (n, m))
    return C.count_test(runs, worse, better, testable=testable)


def z_loss(data, scale: str) -> C.FigureResult:
    """The output logsumexp and max |logit| over steps with z-loss 0, 1e-4, 1e-3 (weight decay
    0, a high LR). Tests: z-loss 1e-4 keeps |logsumexp| nearer 0 over the second half of the
    run (drift either way) and, if runs without it diverged, prevents the divergence."""
    runs = C.with_columns(data.runs, _z_name)
    order = sorted(set(runs["variant"]), key=lambda n: 0.0 if n == "no z-loss"
                   else float(n.split()[1]))
    colors = style.palette(order)
    runs["lse_drift"] = C.reduce_metric(runs, data.metrics, "logsumexp_mean",
                                        lambda s: float(np.mean(np.abs(s))), last_fraction=0.5)
    runs["logit_peak"] = C.reduce_metric(runs, data.metrics, "logit_max_abs", "max")
    held = runs.assign(c=C.capped(runs))
    control, treated = "no z-loss", "z-loss 1e-4"
    arms = [n for n in (control, treated) if n in order]
    ok = C.is_testable(runs, arms)
    tests: dict[str, C.Comparison | C.V.Test] = {
        "logsumexp_nearer_zero": C.compare(C.per_seed(runs, "lse_drift", treated),
                                           C.per_seed(runs, "lse_drift", control), testable=ok),
        "divergence_prevented": _divergence_test(runs, control, treated, ok)}
    numbers = {"lr": float(runs["lr"].iloc[0]) if len(runs) else None,
               "weight_decay": float(runs["optim.weight_decay"].iloc[0]) if len(runs) else None,
               "logsumexp_abs_second_half": C.by_variant(runs, "lse_drift", order),
               "logit_max_abs_peak": C.by_variant(runs, "logit_peak", order, log=True),
               "eval_loss_capped": C.by_variant(held, "c", order),
               "diverged_runs": {n: "{}/{}".format(int(g["diverged"].sum()), len(g))
                                 for n in order for g in [runs[runs["variant"] == n]]}}
    if "z-loss 1e-3" in order:
        numbers["z_1e-3_logsumexp_nearer_zero"] = C.compare(
            C.per_seed(runs, "lse_drift", "z-loss 1e-3"), C.per_seed(runs, "lse_drift", control),
            testable=C.is_testable(runs, [control, "z-loss 1e-3"])).to_json()
    numbers["z_loss_costs_held_out_loss"] = C.compare(
        C.per_seed(held, "c", control), C.per_seed(held, "c", treated), testable=ok).to_json()
    fig, axes = plt.subplots(1, 3, figsize=style.figsize("double", 0.34),
                             gridspec_kw={"width_ratios": [1.2, 1.2, 0.8]})
    C.curve_panel(axes[0], data.metrics, runs, "logsumexp_mean", order, colors,
                  "Output logsumexp\n(mean over tokens, nats)",
                  f"(a) logsumexp, LR {numbers['lr']:g}")
    axes[0].axhline(0.0, color="0.5", linewidth=0.6, zorder=1)
    C.curve_panel(axes[1], data.metrics, runs, "logit_max_abs", order, colors,
                  "Max |output logit|\n(log scale)", "(b) max |logit|", log=True)
    C.held_out_panel(axes[2], runs, order, colors, held, "(c) held-out loss")
    fig.tight_layout()
    C.figure_legend(fig, axes[0], title=f"Llama2 recipe, {C.regime(runs.iloc[0])}; thin: "
                    "seeds, thick: median")
    d = numbers["logsumexp_abs_second_half"]
    finding = (f"LR {numbers['lr']:g}, weight decay {numbers['weight_decay']:g}: mean "
               "|logsumexp| over the second half " + ", ".join(
                   f"{n} {C.fmt(d[n])} {_seed_values(d[n])}" for n in order)
               + "; diverged runs " + ", ".join(f"{n} {v}" for n, v in
                                               numbers["diverged_runs"].items())
               + "; held-out loss " + ", ".join(
                   f"{n} {C.fmt(numbers['eval_loss_capped'][n])}" for n in order) + ". "
               + "; ".join(_test_text(k, t) for k, t in tests.items())
               + " (the logsumexp part follows from the penalty itself; the divergence part "
                 "is the stability claim). " + _levels_text(runs, arms))
    return C.result(fig, tests, finding, numbers, _runs_json(
        runs, z_loss=lambda r: float(r["loss.z_loss"]),
        logsumexp_abs_second_half=lambda r: float(r["lse_drift"]),
        logit_max_abs_peak=lambda r: float(r["logit_peak"])),
        C.definitions("eval_loss", "diverged", logsumexp_abs_second_half=(
            "mean of |logsumexp_mean| (metrics.jsonl: the mean over tokens of logsumexp of the "
            "output logits) over the logged steps of the run's second half: drift away from 0 "
            "either way"), logit_max_abs_peak="max over steps of metrics.jsonl logit_max_abs "
            "(geometric mean over seeds)"),
        runs, dict.fromkeys(tests, arms), C.grid_json(runs))


# --- Spike No More --------------------------------------------------------------------------


def spike_no_more(data, scale: str) -> C.FigureResult:
    """Gradient-norm spikes at a moderate LR with embeddings plain, scaled by sqrt(d), or
    layernormed, at init std 0.005 (the claim's condition: small embeddings) and 0.02. Tests at
    std 0.005: each remedy lowers the grad-norm spike against plain, paired by seed."""
    runs = C.spike_columns(C.with_columns(data.runs, _init_name), data.metrics)
    stds = sorted({float(x) for x in runs["model.init_std"]})
    kinds = ("plain", "×√d", "LN")
    order = [f"std {s:g}, {k}" for s in stds for k in kinds
             if f"std {s:g}, {k}" in set(runs["variant"])]
    colors = style.palette(order)
    small = stds[0] if stds else 0.005
    plain, remedies = f"std {small:g}, plain", [f"std {small:g}, {k}" for k in kinds[1:]]
    keys = {"×√d": "scaled_spikes_less", "LN": "layernorm_spikes_less"}
    tests = {keys[k]: C.compare(
        C.per_seed(runs, "gn_spike", name), C.per_seed(runs, "gn_spike", plain),
        testable=C.is_testable(runs, [plain, name]))
        for k, name in zip(kinds[1:], remedies, strict=True) if name in order}
    test_arms = {keys[k]: [plain, name] for k, name in zip(kinds[1:], remedies, strict=True)
                 if keys[k] in tests}
    held = runs.assign(c=C.capped(runs))
    numbers = {"lr": float(runs["lr"].iloc[0]) if len(runs) else None,
               "grad_norm_spike": C.by_variant(runs, "gn_spike", order),
               "grad_norm_peak": C.by_variant(runs, "gn_peak", order, log=True),
               "loss_spikes": C.by_variant(runs, "loss_spikes", order),
               "embedding_std_start": C.by_variant(runs, "emb_std_start", order, log=True),
               "embedding_std_end": C.by_variant(runs, "emb_std_end", order, log=True),
               "eval_loss_capped": C.by_variant(held, "c", order)}
    for s in stds[1:]:  # the same comparisons at the larger init: reported, not the claim
        for k in kinds[1:]:
            a, b = f"std {s:g}, {k}", f"std {s:g}, plain"
            if a in order and b in order:
                numbers[f"std_{s:g}_{k}_vs_plain"] = C.compare(
                    C.per_seed(runs, "gn_spike", a), C.per_seed(runs, "gn_spike", b),
                    testable=C.is_testable(runs, [a, b])).to_json()
    at_small = runs[np.isclose(runs["model.init_std"].astype(float), small)]
    shown = [plain, *[r for r in remedies if r in order]]
    fig, axes = plt.subplots(1, 3, figsize=style.figsize("double", 0.34),
                             gridspec_kw={"width_ratios": [1.2, 1.2, 1.0]})
    C.curve_panel(axes[0], data.metrics, at_small, "grad_norm", shown, colors,
                  "Gradient norm\n(L2, log scale)", f"(a) gradient norm, std {small:g}",
                  log=True)
    C.curve_panel(axes[1], data.metrics, at_small, "loss", shown, colors,
                  "Training loss\n(nats/token, log scale)", f"(b) training loss, std {small:g}",
                  log=True)
    C.bars(axes[2], runs, "gn_spike", order, colors)
    axes[2].set_ylim(bottom=0)
    axes[2].set_ylabel("Grad-norm spike\nlog10(max / median)")
    axes[2].set_title("(c) spike size, all variants", loc="left", fontsize=7)
    fig.tight_layout()
    C.figure_legend(fig, axes[0], title=f"GPT recipe, LR {numbers['lr']:g}, "
                    f"{C.regime(runs.iloc[0])}; embeddings plain, scaled by √d, layernormed "
                    "(LN); thin: seeds, thick: median", ncol=3)
    g, es, ls = (numbers["grad_norm_spike"], numbers["embedding_std_start"],
                 numbers["loss_spikes"])
    finding = (f"LR {numbers['lr']:g}: grad-norm spike log10(max/median) " + ", ".join(
        f"{n} {C.fmt(g[n])} {_seed_values(g[n])}" for n in order)
        + "; peak grad norm " + ", ".join(f"{n} {C.fmt(numbers['grad_norm_peak'][n], 1)}"
                                          for n in order)
        + "; loss spikes per run " + ", ".join(f"{n} {C.fmt(ls[n], 1)}" for n in order)
        + "; embedding std at step 1 " + ", ".join(f"{n} {C.fmt(es[n], sci=True)}"
                                                   for n in order) + ". "
        + "; ".join(_test_text(k, t) for k, t in tests.items()) + ". "
        + _levels_text(runs, shown))
    return C.result(fig, tests, finding, numbers, _runs_json(
        runs, init_std=lambda r: float(r["model.init_std"]),
        scaled_embedding=lambda r: bool(r["model.scaled_embedding"]),
        embedding_layernorm=lambda r: bool(r["model.embedding_layernorm"]),
        grad_norm_spike=lambda r: float(r["gn_spike"]),
        grad_norm_peak=lambda r: float(r["gn_peak"]),
        loss_spikes=lambda r: int(r["loss_spikes"]),
        embedding_std_start=lambda r: float(r["emb_std_start"])),
        C.definitions("eval_loss", **C.SPIKE_DEFS), runs, test_arms, C.grid_json(runs))
