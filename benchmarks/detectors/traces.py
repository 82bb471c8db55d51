"""Labelled synthetic training traces for the detector benchmark (seeded, deterministic).

Every trace is a list of ``metrics.jsonl`` rows (``step``, ``loss``, ``grad_norm``, ``lr``,
``tokens``, ``time``, ``attn_logit_max``, ``logsumexp_mean``, ``update_ratio_max``) plus its
incidents. A trace is a pure function of its seed and family. This is the family the detectors
are tuned on (``synthetic``); :mod:`benchmarks.detectors.published` and the real traces are
held out.

The loss is ``trend * (1 + bump) * (1 + incident) * (1 + benign)``:

- ``trend``: a power law in training progress (cumulative LR / peak LR) from ~ln(vocab) to an
  irreducible loss of 1.6-3.0, so warm-up is slow, the early curve falls steeply, and LR decay
  (cosine, or the decay phase of WSD) adds an extra drop; sometimes a slow benign drift (up by
  1-3 noise sigmas, or down by 2-8%, over 150-600 steps).
- ``benign``: per-step noise whose relative scale ``s`` (0.4-2% late in training) is up to
  2.5x larger early on, Student-t noise bursts (heavier tails, 1.5-3x the scale, for 30-300
  steps; the scale never exceeds :data:`NOISE_MAX`), and hard (or easy) batches of 2.5-5
  noise sigmas on single steps. Its magnitude is capped at :data:`BENIGN_SIGMAS` sigmas.
- ``bump``: benign sustained bumps (a harder stretch of data) of at most
  :data:`BENIGN_SUSTAINED_SIGMAS` sigmas.
- ``incident``: the injected spikes (``spike`` family only), early blow-ups included.

Labels (objective, from the noise-free incident excess ``e`` = loss / clean loss - 1 and the
local noise scale ``s``, the smallest of the last :data:`NOISE_MEMORY` steps): an injected
incident is a spike if ``log(1 + e) >= SPIKE_SIGMAS * s`` on some step, or
``log(1 + e) >= SUSTAIN_SIGMAS * s`` on ``SUSTAIN`` consecutive steps, and ``e >= SPIKE_MIN``
either way. A spike is measured in noise units, not in shares of the loss: 12% is
a spike on a curve with 1% noise, 20% is not one on a curve with 5% noise. Its onset is the
first step where either holds (the first step of the sustained run). Non-finite incidents start
at the first NaN/Inf in ``loss`` or ``grad_norm``. Benign deviations are generated strictly
below these levels (single steps at most ``BENIGN_SIGMAS``, sustained ones at most
``BENIGN_SUSTAINED_SIGMAS``), and injected spikes clearly above them, so no incident falls in
the grey zone between. An incident's window runs from the first step it changes anything (its
leading-statistic precursor included) to :data:`INCIDENT_TAIL` steps after its excess is back
under 2% (the end of the trace when it never recovers); an event inside the window detects it,
an event outside every window is a false alarm. Early blow-ups also record ``cross``, the first
step their loss passes the loss at init: they must be warned before it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SPIKE_SIGMAS = 8.0
"""A step this many noise sigmas above the clean loss (relative) makes a spike."""
SUSTAIN_SIGMAS = 5.0
"""... or this many on ``SUSTAIN`` consecutive steps."""
SUSTAIN = 3
SPIKE_MIN = 0.02
"""... and at least this far above it (relative) either way."""
BENIGN_SIGMAS = 5.0
"""Benign single-step deviations (noise + hard batches) are capped at this many sigmas."""
BENIGN_SUSTAINED_SIGMAS = 1.5
"""Benign sustained bumps stay at or below this many sigmas."""
NOISE_MAX = 0.05
"""Largest relative scale of the per-step loss noise (early training inside a burst)."""
NOISE_MEMORY = 30
"""The labels' noise sigma at a step is the smallest noise scale of the last this many steps."""
INCIDENT_TAIL = 20
"""Steps after an incident's excess falls under 2% that still belong to it."""
FIRST_ONSET = 80
"""No incident starts before this step (detectors need some history)."""
PRECURSOR_MIN_ONSET = 150
"""Leading-statistic precursors only for incidents with onset at or after this step."""

LEADING = ("attn_logit_max", "logsumexp_mean", "update_ratio_max")

TUNE_SEED0 = 0
"""Tuning seeds: ``TUNE_SEED0 + i``. The detectors were tuned on these only."""
HELDOUT_SEED0 = 200_000
"""More seeds of the same generator (``synthetic-heldout``): a check against over-fitting the
tuning seeds, not an independent family (that is :mod:`benchmarks.detectors.published` and the
real traces)."""


@dataclass
class Incident:
    """One labelled incident of a trace.

    Attributes:
        kind: ``spike`` or ``nonfinite``.
        shape: ``jump``, ``slow_rise``, ``plateau``, ``divergence``, ``nan_single``,
            ``nan_persist``, ``inf_grad`` (or a label from a real trace).
        start: First step of the window (first step the injection changes anything).
        onset: Labelled onset step.
        end: Last step of the window (inclusive).
        peak: Peak relative excess of the loss (inf for non-finite).
        precursor: Leading metrics that grow before the onset.
        precursor_start: First step of that growth (None without precursor).
        cross: For a blow-up, the first step its loss passes the loss at init (warnings must
            come before it); None otherwise.
    """

    kind: str
    shape: str
    start: int
    onset: int
    end: int
    peak: float
    precursor: list[str] = field(default_factory=list)
    precursor_start: int | None = None
    cross: int | None = None


@dataclass
class Trace:
    """A labelled trace: rows as the loop writes them, incidents, and what was injected."""

    name: str
    seed: int
    family: str
    rows: list[dict[str, Any]]
    incidents: list[Incident]
    info: dict[str, Any] = field(default_factory=dict)
    trend: list[float] | None = None
    """The noise-free clean loss (diagnostics only: the oracle trend; detectors never see it)."""
    noise: list[float] | None = None
    """The labels' noise sigma per step (diagnostics only)."""


# --- helpers ---------------------------------------------------------------------------------


def _logu(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _sigmoid_ramp(n: int, start: int, length: int) -> np.ndarray:
    t = np.arange(n)
    return 1.0 / (1.0 + np.exp(np.clip(-(t - start - length / 2) / (length / 8), -50, 50)))


def label_onset(e: np.ndarray, s: np.ndarray) -> int | None:
    """Onset by the label rule, in log units (``u = log(1 + e)``): first step with
    ``u >= SPIKE_SIGMAS * s`` (and ``e >= SPIKE_MIN``), or first step of a run of ``SUSTAIN``
    steps with ``u >= SUSTAIN_SIGMAS * s`` (and ``e >= SPIKE_MIN``); None if neither."""
    u = np.log1p(e)
    big = np.flatnonzero((u >= SPIKE_SIGMAS * s) & (e >= SPIKE_MIN))
    on = int(big[0]) if big.size else None
    ok = (u >= SUSTAIN_SIGMAS * s) & (e >= SPIKE_MIN)
    run = 0
    for i, b in enumerate(ok):
        run = run + 1 if b else 0
        if run == SUSTAIN:
            j = i - SUSTAIN + 1
            on = j if on is None else min(on, j)
            break
    return on


# --- the background: a clean run -------------------------------------------------------------


def _background(rng: np.random.Generator, n: int) -> dict[str, Any]:
    t = np.arange(n)
    warm = max(10, int(n * rng.uniform(0.01, 0.08)))
    sched = str(rng.choice(["cosine", "wsd", "constant"], p=[0.45, 0.4, 0.15]))
    f = np.ones(n)
    f[:warm] = (t[:warm] + 1) / warm
    decay_start = n
    if sched == "cosine":
        lo = rng.uniform(0.0, 0.1)
        p = (t[warm:] - warm) / max(1, n - warm)
        f[warm:] = lo + (1 - lo) * 0.5 * (1 + np.cos(np.pi * p))
        decay_start = warm
    elif sched == "wsd":
        decay_start = int(n * (1 - rng.uniform(0.1, 0.25)))
        f[decay_start:] = np.linspace(1.0, 0.01, n - decay_start)
    f = np.maximum(f, 1e-3)
    lr_max = 10 ** rng.uniform(-4, -2.5)
    lr = lr_max * f
    progress = np.cumsum(f)

    vocab = int(rng.choice([256, 8192, 32000, 50257, 128256]))
    l0 = math.log(vocab) + rng.uniform(0.0, 0.3)
    linf = rng.uniform(1.6, 3.0)
    t0 = rng.uniform(3, 40)
    alpha = rng.uniform(0.35, 0.9)
    trend = linf + (l0 - linf) * (1 + progress / t0) ** (-alpha)
    # LR decay drops the loss faster than the power law alone (strongest for WSD)
    drop = rng.uniform(0.02, 0.08) if sched == "wsd" else rng.uniform(0.0, 0.04)
    u = np.where(t >= max(warm, decay_start), 1.0 - f, 0.0)
    trend = trend * (1 - drop * u**1.5)
    info: dict[str, Any] = {"schedule": sched, "warmup": warm, "vocab": vocab, "drift": None}
    sb = _logu(rng, 0.004, 0.02)  # the late noise scale
    if rng.random() < 0.35:  # slow benign drift (data-mix change): part of the trend
        # up by 1-3 noise sigmas (a slow rise of more is what a creeping divergence looks
        # like), or down by 2-8%
        up = rng.random() < 0.7
        amp = sb * rng.uniform(1.0, 3.0) if up else -rng.uniform(0.02, 0.08)
        ds, dl = int(rng.uniform(0.15, 0.8) * n), int(rng.integers(150, 600))
        trend = trend * (1 + amp * _sigmoid_ramp(n, ds, dl))
        info["drift"] = {"start": ds, "length": dl, "amplitude": round(float(amp), 4)}

    # benign noise: relative scale shrinking with the loss, Student-t bursts, hard batches
    early = rng.uniform(0.0, 1.5)
    sig = sb * (1 + early * (trend - linf) / (l0 - linf))
    eps = rng.standard_normal(n)
    env = np.ones(n)
    bursts = []
    for _ in range(int(rng.integers(0, 4))):
        bs, bl = int(rng.integers(20, n - 20)), int(rng.integers(30, 300))
        mult = rng.uniform(1.5, 3.0)
        ramp = int(rng.integers(5, 20))
        shape = _sigmoid_ramp(n, bs - ramp, 2 * ramp) * (
            1 - _sigmoid_ramp(n, bs + bl - ramp, 2 * ramp)
        )
        env = np.maximum(env, 1 + (mult - 1) * shape)  # overlapping bursts do not compound
        inside = shape > 0.05
        eps = np.where(inside, rng.standard_t(4, n) / math.sqrt(2.0), eps)
        bursts.append({"start": bs, "length": bl, "mult": round(float(mult), 2)})
    noise_scale = np.minimum(sig * env, NOISE_MAX)
    noise = noise_scale * eps
    # the noise sigma the labels use: the smallest scale of the last NOISE_MEMORY steps, the
    # noise the run has shown (a burst's first steps are measured against the noise before it)
    scale = np.array([noise_scale[max(0, i - NOISE_MEMORY) : i + 1].min() for i in range(n)])
    p_hb = rng.uniform(0.005, 0.03)
    hb_mask = rng.random(n) < p_hb
    hb = np.where(hb_mask, rng.uniform(2.5, BENIGN_SIGMAS, n) * scale, 0.0)
    hb = hb * np.where(rng.random(n) < 0.8, 1.0, -1.0)
    benign = np.clip(noise + hb, -BENIGN_SIGMAS * scale, BENIGN_SIGMAS * scale)

    bump = np.zeros(n)
    for _ in range(int(rng.integers(0, 3))):
        s0 = int(rng.integers(40, n - 10))
        m = rng.uniform(0.5, BENIGN_SUSTAINED_SIGMAS) * scale[s0]
        if rng.random() < 0.5:
            tau = rng.uniform(3, 40)
            k = np.arange(n - s0)
            bump[s0:] += m * np.exp(-k / tau)
        else:
            hold = int(rng.integers(10, 60))
            bump[s0 : s0 + hold] += m
    bump = np.minimum(bump, BENIGN_SUSTAINED_SIGMAS * scale)

    # grad norm: falls early, creeps up late; lognormal noise; isolated benign spikes
    g0, ginf = rng.uniform(2, 15), 10 ** rng.uniform(-0.7, 0.2)
    tg = rng.uniform(30, 300)
    grad = ginf + (g0 - ginf) * np.exp(-progress / tg)
    grad = grad * (1 + rng.uniform(0, 1.0) * t / n)
    grad = grad * np.exp(rng.uniform(0.04, 0.15) * env * rng.standard_normal(n))
    gs_mask = rng.random(n) < rng.uniform(0, 0.01)
    grad = grad * np.where(gs_mask, rng.uniform(1.3, 3.0, n), 1.0)

    # attention logits: grow towards a plateau; noisy max; benign blips and slow drifts
    a0, ainf = rng.uniform(1, 5), rng.uniform(8, 60)
    attn = ainf - (ainf - a0) * np.exp(-progress / rng.uniform(100, 800))
    if rng.random() < 0.3:
        attn = attn * (
            1
            + rng.uniform(0.2, 1.0)
            * _sigmoid_ramp(n, int(rng.integers(50, n)), int(rng.integers(100, 500)))
        )
    attn = attn * np.exp(rng.uniform(0.01, 0.06) * rng.standard_normal(n))
    blip = rng.random(n) < rng.uniform(0, 0.01)
    attn = attn * np.where(blip, rng.uniform(1.1, 1.5, n), 1.0)

    # logsumexp of the output logits: from ~ln(vocab) towards its own level; drifts
    z0 = math.log(vocab) + rng.uniform(-0.5, 1.0)
    zf = rng.uniform(-1.0, 8.0)
    lse = zf + (z0 - zf) * np.exp(-t / rng.uniform(20, 300))
    if rng.random() < 0.3:
        lse = lse + rng.uniform(-3, 3) * _sigmoid_ramp(
            n, int(rng.integers(50, n)), int(rng.integers(100, 500))
        )
    lse = lse + rng.uniform(0.02, 0.2) * rng.standard_normal(n)

    # update/parameter ratio: proportional to the LR, larger early, noisy, benign blips
    c = 10 ** rng.uniform(-3.5, -2.0) / lr_max
    upd = c * lr * (1 + rng.uniform(0, 3) * np.exp(-t / rng.uniform(10, 80)))
    upd = upd * np.exp(rng.uniform(0.03, 0.12) * rng.standard_normal(n))
    ublip = rng.random(n) < rng.uniform(0, 0.01)
    upd = upd * np.where(ublip, rng.uniform(1.2, 1.8, n), 1.0)

    info.update(
        bursts=bursts, hard_batches=int(hb_mask.sum()), noise=round(float(sb), 4),
        benign_grad_spikes=int(gs_mask.sum()), attn_blips=int(blip.sum()),
    )  # fmt: skip
    return {
        "n": n, "lr": lr, "trend": trend, "benign": benign, "bump": bump, "grad": grad,
        "scale": scale, "l0": float(trend[0]),
        "attn": attn, "lse": lse, "upd": upd, "info": info,
        "tokens_per_step": int(rng.choice([8 * 128, 1536 * 2048, 1728 * 4096])),
    }  # fmt: skip


# --- injected incidents ----------------------------------------------------------------------


def _decay(m: float, tau: float, length: int) -> np.ndarray:
    return m * np.exp(-np.arange(length) / tau)


def _spike_profile(
    rng: np.random.Generator, shape: str, n: int, s0: int, last: bool, sig: float
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Relative loss excess and grad-norm factor of one injected spike starting at ``s0``.

    ``sig`` is the local noise sigma: magnitudes are drawn either as shares of the loss (the
    large spikes of small runs) or in noise sigmas (the 5-15% spikes of quiet large runs), and
    never below what the label needs with a margin.
    """
    e = np.zeros(n)
    gmul = np.ones(n)
    kg = rng.uniform(2, 15)
    meta: dict[str, Any] = {}
    rest = n - s0
    floor = max(1.5 * SPIKE_MIN, math.expm1(1.25 * SPIKE_SIGMAS * sig))  # a clear spike
    if shape == "jump":
        u = rng.random()
        if u < 0.4:
            m, tau = max(floor, _logu(rng, 0.3, 3.0)), _logu(rng, 1.0, 80.0)
        elif u < 0.7:  # sharp, a few noise sigmas wide: the spikes of a quiet run
            m, tau = max(floor, sig * rng.uniform(10, 30)), _logu(rng, 1.0, 40.0)
        else:  # smaller, but lasting: at least 6 sigmas two steps later
            m = max(1.5 * SPIKE_MIN, math.expm1(sig * rng.uniform(7, 12)))
            m6 = max(math.expm1(6 * sig), SPIKE_MIN * 1.2)
            tau = rng.uniform(max(3.0, 2.0 / math.log(m / m6)), 80.0) if m > m6 * 1.01 else 80.0
        e[s0:] = _decay(m, tau, rest)
        tg = min(tau, rng.uniform(1, 5))
        gmul[s0:] = 1 + kg * _decay(m, tg, rest)
        meta = {"m": m, "tau": tau}
    elif shape in ("slow_rise", "divergence"):
        # most rise over 8-60 steps; some creep over 60-300 (OPT-175B's logbook: divergences
        # that built up over hundreds of steps)
        d = int(rng.integers(8, 61)) if rng.random() < 0.7 else int(rng.integers(60, 301))
        rho = d / rng.uniform(2, 5)
        m = _logu(rng, 0.3, 4.0) if rng.random() < 0.7 else sig * rng.uniform(10, 30)
        m = max(m, floor)
        k = np.arange(min(d + 1, rest))
        e[s0 : s0 + k.size] = m * (np.exp(k / rho) - 1) / (math.exp(d / rho) - 1)
        if shape == "divergence":  # keeps growing, capped at 10x
            k2 = np.arange(rest - k.size) + d + 1
            e[s0 + k.size :] = np.minimum(
                m * (np.exp(k2 / (rho * 4)) - 1) / (math.exp(d / (rho * 4)) - 1), 9.0
            )
        elif s0 + d + 1 < n:
            tau = _logu(rng, 3.0, 100.0)
            e[s0 + d + 1 :] = _decay(m, tau, n - s0 - d - 1) * math.exp(-1 / tau)
            meta["tau"] = tau
        gmul = 1 + kg * 0.5 * e
        meta.update(m=m, rise=d)
    elif shape == "plateau":
        r = int(rng.integers(1, 6))
        m = _logu(rng, 0.18, 1.0) if rng.random() < 0.6 else sig * rng.uniform(6, 15)
        m = max(m, 1.5 * SPIKE_MIN, math.expm1(1.5 * SUSTAIN_SIGMAS * sig))
        hold = n if last and rng.random() < 0.3 else int(rng.integers(20, 300))
        tau = _logu(rng, 5.0, 100.0)
        for i in range(rest):
            if i < r:
                e[s0 + i] = m * (i + 1) / r
            elif i < r + hold:
                e[s0 + i] = m
            else:
                e[s0 + i] = m * math.exp(-(i - r - hold + 1) / tau)
        gmul = 1 + kg * 0.3 * e
        meta = {"m": m, "hold": hold, "tau": tau}
    return e, gmul, meta


def _early_blowup(
    rng: np.random.Generator, bg: dict[str, Any], n: int
) -> tuple[np.ndarray, int, str, list[str], int | None] | None:
    """An early blow-up (no or short warm-up, LR too high): once the loss has fallen 10-30%
    below its value at init (by step 60; None when the trace's warm-up is too slow for that),
    it climbs back past it within 4-35 steps (DESIGN.md's pilots: GPT-
    style runs climbing above the loss at init with output logsumexp rising to 26-92, attention
    logits crossing 1000 within a few dozen steps). It then dies (NaN), stays up, or recovers
    slowly. In 70% of them the grad norm and some leading statistics grow from a few steps
    before the climb. Returns the excess, its start, its fate, the precursors and their start.
    """
    trend = bg["trend"]
    below = np.flatnonzero(trend <= (1 - rng.uniform(0.1, 0.3)) * bg["l0"])
    if not below.size or below[0] > 50:
        return None
    s0 = int(below[0]) + int(rng.integers(0, 11))
    d = int(rng.integers(4, 36))
    top = bg["l0"] * rng.uniform(1.15, 3.0) / trend[min(n - 1, s0 + d)] - 1  # excess at the top
    rho = d / rng.uniform(1.5, 4)
    k = np.arange(d + 1)
    e = np.zeros(n)
    e[s0 : s0 + d + 1] = top * (np.exp(k / rho) - 1) / (math.exp(d / rho) - 1)
    fate = str(rng.choice(["nan", "stay", "recover"], p=[0.35, 0.3, 0.35]))
    if fate == "stay":
        e[s0 + d + 1 :] = top
    elif fate == "recover":
        tau = rng.uniform(30, 200)
        e[s0 + d + 1 :] = top * np.exp(-np.arange(n - s0 - d - 1) / tau)
    pre: list[str] = []
    ps = None
    if rng.random() < 0.7:
        lead = int(rng.integers(0, 11))
        ps = max(1, s0 - lead)
        ramp = np.zeros(n)
        length = s0 + d - ps
        ramp[ps : s0 + d + 1] = (np.exp(np.arange(length + 1) / (length / 3 + 1)) - 1) / (
            math.exp(length / (length / 3 + 1)) - 1
        )
        ramp[s0 + d + 1 :] = 1.0 if fate != "recover" else np.exp(-np.arange(n - s0 - d - 1) / 50)
        pre = [m for m in LEADING if rng.random() < 0.6]
        for m in pre:
            if m == "attn_logit_max":
                bg["attn"] = bg["attn"] * np.exp(rng.uniform(math.log(3), math.log(50)) * ramp)
            elif m == "update_ratio_max":
                bg["upd"] = bg["upd"] * np.exp(rng.uniform(math.log(2), math.log(10)) * ramp)
            else:
                bg["lse"] = bg["lse"] + rng.uniform(5, 60) * ramp
        bg["grad"] = bg["grad"] * np.exp(rng.uniform(math.log(3), math.log(30)) * ramp)
        pre = pre or ["grad_norm"]
    return e, s0, fate, pre, ps


def _precursor(
    rng: np.random.Generator, bg: dict[str, Any], onset: int, e: np.ndarray
) -> tuple[list[str], int]:
    """Grow leading statistics before ``onset``; returns the metrics and the first step."""
    n = bg["n"]
    chosen = [m for m in LEADING if rng.random() < 0.6] or [str(rng.choice(LEADING))]
    p = int(rng.integers(4, 26))
    ps = onset - p
    rho = p / rng.uniform(2, 4)
    k = np.arange(p + 1)
    ramp = np.zeros(n)
    ramp[ps : onset + 1] = (np.exp(k / rho) - 1) / (math.exp(p / rho) - 1)
    after = np.flatnonzero(e[onset:] < 0.02)
    hold_end = onset + (int(after[0]) if after.size else n - onset)
    ramp[onset + 1 : hold_end] = 1.0
    if hold_end < n:
        ramp[hold_end:] = np.exp(-np.arange(n - hold_end) / 20.0)
    for m in chosen:
        if m == "attn_logit_max":
            bg["attn"] = bg["attn"] * np.exp(rng.uniform(math.log(2), math.log(20)) * ramp)
        elif m == "update_ratio_max":
            bg["upd"] = bg["upd"] * np.exp(rng.uniform(math.log(2), math.log(20)) * ramp)
        else:
            bg["lse"] = bg["lse"] + rng.uniform(3, 30) * ramp
    bg["grad"] = bg["grad"] * np.exp(rng.uniform(math.log(1.5), math.log(4)) * ramp)
    return chosen, ps


def _window_end(e: np.ndarray, onset: int, n: int) -> int:
    big = np.flatnonzero(e[onset:] >= 0.02)
    last = onset + int(big[-1]) if big.size else onset
    return n - 1 if last >= n - 1 else min(n - 1, last + INCIDENT_TAIL)


def make_trace(seed: int, family: str) -> Trace:
    """One trace; ``family`` is ``clean`` (hard negatives only) or ``spike``."""
    if family not in ("clean", "spike"):
        raise ValueError(f"family={family!r} is not allowed: one of clean, spike")
    rng = np.random.default_rng([seed, 0 if family == "clean" else 1])
    n = int(rng.integers(800, 2001))
    bg = _background(rng, n)
    e_all = np.zeros(n)
    nan_loss = np.zeros(n, dtype=bool)
    bad_grad = np.zeros(n)  # 0 ok, 1 NaN, 2 Inf
    incidents: list[Incident] = []
    if family == "spike":
        cur = int(rng.integers(FIRST_ONSET, 300))
        count = int(rng.integers(1, 4))
        early = _early_blowup(rng, bg, n) if rng.random() < 0.3 else None
        if early is not None:  # an early blow-up first
            e, s0, fate, pre, ps = early
            onset = label_onset(e, bg["scale"])
            if onset is None:
                raise AssertionError(f"seed {seed}: early blow-up is not a spike")
            over = np.flatnonzero(bg["trend"] * (1 + e) > bg["l0"])
            cross = int(over[0])
            e_all = e_all + e
            bg["grad"] = bg["grad"] * (1 + 5 * e)
            end = n - 1 if fate != "recover" else _window_end(e, onset, n)
            if fate == "nan":
                top = int(np.argmax(e[: s0 + 40]))
                nan_loss[top + 1 :] = True
                bad_grad[top + 1 :] = 1
            start = min(s0, ps if ps is not None else n)
            incidents.append(
                Incident("spike", "early_blowup", start, onset, end, float(e.max()), pre, ps,
                         cross)
            )
            count = 0 if end >= n - 1 else count
            cur = end + int(rng.integers(50, 300))
        for i in range(count):
            if cur >= n - 40:
                break
            last = i == count - 1  # only the last incident may end the run
            shapes = ["jump", "slow_rise", "plateau", "nan_single", "inf_grad"]
            probs = [0.32, 0.27, 0.2, 0.1, 0.11]
            if last:
                shapes += ["divergence", "nan_persist"]
                probs = [0.28, 0.23, 0.18, 0.08, 0.09, 0.07, 0.07]
            shape = str(rng.choice(shapes, p=probs))
            if shape.startswith("nan") or shape == "inf_grad":
                inc = _inject_nonfinite(rng, shape, n, cur, nan_loss, bad_grad, last)
                incidents.append(inc)
            else:
                e, gmul, _ = _spike_profile(rng, shape, n, cur, last, float(bg["scale"][cur]))
                onset = label_onset(e, bg["scale"])
                if onset is None:  # cannot happen by construction; keep the trace honest
                    raise AssertionError(f"seed {seed}: {shape} injection is not a spike")
                pre: list[str] = []
                ps = None
                if shape in ("jump", "slow_rise") and onset >= PRECURSOR_MIN_ONSET:
                    if rng.random() < 0.5:
                        pre, ps = _precursor(rng, bg, onset, e)
                nz = np.flatnonzero(e > 0.005)
                start = min(int(nz[0]), ps if ps is not None else n)
                end = _window_end(e, onset, n)
                e_all = e_all + e
                bg["grad"] = bg["grad"] * gmul
                # a slow rise can end in NaN: the run is dead from there
                if shape == "slow_rise" and last and rng.random() < 0.3:
                    top = int(np.argmax(e))
                    nan_loss[top + 1 :] = True
                    bad_grad[top + 1 :] = 1
                    end = n - 1
                inc = Incident("spike", shape, start, onset, end, float(e.max()), pre, ps)
                incidents.append(inc)
            if inc.end >= n - 1:
                break
            cur = inc.end + int(rng.integers(50, 300))

    loss = bg["trend"] * (1 + bg["bump"]) * (1 + e_all) * (1 + bg["benign"])
    loss = np.where(nan_loss, np.nan, loss)
    grad = np.where(bad_grad == 1, np.nan, np.where(bad_grad == 2, np.inf, bg["grad"]))
    dt = float(rng.uniform(0.05, 2.0))
    rows = []
    for i in range(n):
        rows.append(
            {
                "step": i,
                "loss": float(loss[i]),
                "grad_norm": float(grad[i]),
                "lr": float(bg["lr"][i]),
                "tokens": (i + 1) * bg["tokens_per_step"],
                "time": round(i * dt, 3),
                "attn_logit_max": float(bg["attn"][i]),
                "logsumexp_mean": float(bg["lse"][i]),
                "update_ratio_max": float(bg["upd"][i]),
            }
        )
    trend = [float(x) for x in bg["trend"]]
    noise = [float(x) for x in bg["scale"]]
    return Trace(f"{family}-{seed}", seed, family, rows, incidents, bg["info"], trend, noise)


def _inject_nonfinite(
    rng: np.random.Generator,
    shape: str,
    n: int,
    s0: int,
    nan_loss: np.ndarray,
    bad_grad: np.ndarray,
    last: bool,
) -> Incident:
    if shape == "nan_single":
        k = int(rng.integers(1, 4))
        nan_loss[s0 : s0 + k] = True
        bad_grad[s0 : s0 + k] = 1
        end = min(n - 1, s0 + k - 1 + INCIDENT_TAIL)
    elif shape == "nan_persist":
        nan_loss[s0:] = True
        bad_grad[s0:] = 1
        end = n - 1
    else:  # inf_grad: overflowing gradients first, the loss is NaN from the next step
        bad_grad[s0] = 2
        k = n if last and rng.random() < 0.5 else int(rng.integers(1, 4))
        nan_loss[s0 + 1 : s0 + 1 + k] = True
        bad_grad[s0 + 1 : s0 + 1 + k] = 1
        end = n - 1 if s0 + 1 + k >= n else s0 + k + INCIDENT_TAIL
    return Incident("nonfinite", shape, s0, s0, min(end, n - 1), math.inf)


def make_set(seed0: int, n_clean: int, n_spike: int) -> list[Trace]:
    """``n_clean`` clean and ``n_spike`` spike traces with seeds ``seed0 + i``."""
    return [make_trace(seed0 + i, "clean") for i in range(n_clean)] + [
        make_trace(seed0 + i, "spike") for i in range(n_spike)
    ]


# --- real traces -----------------------------------------------------------------------------

REAL_DIR = Path(__file__).parent / "real"


def load_real(folder: Path | str = REAL_DIR, split: str | None = None) -> list[Trace]:
    """Labelled real traces: ``folder/**/*.jsonl`` with ``folder/labels.json``.

    ``labels.json`` maps a file's path relative to ``folder`` to ``{"split"?, "incidents":
    [{"kind", "onset", "start"?, "end"?, "shape"?, "cross"?, "precursor"?}, ...]}`` (an empty
    list for a calm run). ``start`` defaults to ``onset``, ``end`` to ``onset + INCIDENT_TAIL``.
    Files without a label entry are skipped (unlabelled data cannot be scored); with ``split``,
    only the entries of that split.
    """
    from stability.detectors import read_metrics

    folder = Path(folder)
    labels_path = folder / "labels.json"
    if not labels_path.exists():
        return []
    labels = json.loads(labels_path.read_text())
    out = []
    for path in sorted(folder.glob("**/*.jsonl")):
        lab = labels.get(path.relative_to(folder).as_posix())
        if lab is None or (split is not None and lab.get("split") != split):
            continue
        rows = list(read_metrics(path))
        incs = []
        for d in lab.get("incidents", []):
            onset = int(d["onset"])
            incs.append(
                Incident(
                    kind=d.get("kind", "spike"),
                    shape=d.get("shape", "real"),
                    start=int(d.get("start", onset)),
                    onset=onset,
                    end=int(d.get("end", onset + INCIDENT_TAIL)),
                    peak=float(d.get("peak", math.nan)),
                    precursor=list(d.get("precursor", [])),
                    precursor_start=d.get("precursor_start"),
                    cross=d.get("cross"),
                )
            )
        family = "spike" if incs else "clean"
        name = path.relative_to(folder).with_suffix("").as_posix()
        out.append(Trace(name, -1, family, rows, incs, {"source": str(path)}))
    return out


def dump(trace: Trace, path: Path | str) -> None:
    """Write a trace as ``metrics.jsonl`` (rows) plus ``<path>.labels.json`` (incidents)."""
    path = Path(path)
    with path.open("w") as f:
        for row in trace.rows:
            f.write(json.dumps(row) + "\n")
    labels = {"incidents": [asdict(i) for i in trace.incidents], "info": trace.info}
    Path(str(path) + ".labels.json").write_text(json.dumps(labels, indent=1, default=str))
