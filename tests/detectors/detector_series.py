"""Synthetic series and a replay shortcut for the detector tests (imported by name)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def falling_loss(n: int = 600, seed: int = 0, noise: float = 0.01) -> list[dict[str, Any]]:
    """A clean early-training curve: power-law fall from ~ln(50k) to ~2.5, relative noise."""
    rng = random.Random(seed)
    rows = []
    for t in range(n):
        trend = 2.5 + 8.3 * (1 + t / 8) ** -0.7
        g = 0.5 + 6 * math.exp(-t / 60)
        rows.append(
            {
                "step": t,
                "loss": trend * (1 + rng.gauss(0, noise)),
                "grad_norm": g * math.exp(rng.gauss(0, 0.08)),
                "lr": 1e-3 * min(1.0, (t + 1) / 50),
                "attn_logit_max": (30 - 25 * math.exp(-t / 300)) * math.exp(rng.gauss(0, 0.03)),
                "logsumexp_mean": 3 + 8 * math.exp(-t / 80) + rng.gauss(0, 0.05),
                "update_ratio_max": 2e-3 * min(1.0, (t + 1) / 50) * math.exp(rng.gauss(0, 0.05)),
            }
        )
    return rows


def heavy_tailed_loss(n: int = 3000, seed: int = 0, noise: float = 0.005) -> list[dict[str, Any]]:
    """The falling curve with Laplace noise (standard deviation ``noise``, log units): rows
    7-8 sigmas out happen every few thousand rows, as in runs with frequent hard batches."""
    rng = random.Random(seed)
    rows = []
    for t in range(n):
        trend = 2.5 + 8.3 * (1 + t / 8) ** -0.7
        e = rng.expovariate(1.0) * (1 if rng.random() < 0.5 else -1) / math.sqrt(2.0)
        rows.append({"step": t, "loss": trend * math.exp(noise * e)})
    return rows


def run(detector: Any, rows: list[dict[str, Any]]) -> list[Any]:
    """Feed rows; all events."""
    out = []
    for r in rows:
        out.extend(detector.update(r["step"], r))
    return out
