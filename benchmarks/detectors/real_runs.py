"""Real traces from this project's own trainer: generate, compact and label them.

``python -m benchmarks.detectors.real_runs generate --split heldout`` trains every run of the
split with ``python -m stability.train`` (one process at a time, one thread, detectors off so
nobody sees detector output while the runs are made), keeps the columns the detectors read, and
writes ``benchmarks/detectors/real/<split>/<name>.jsonl``. ``label`` writes
``benchmarks/detectors/real/labels.json`` from the loss curves alone, by :func:`label_run`
(the rule was written down before any detector ran on these traces; see ``real/README.md``).

The runs mirror the project's studies (sweeps/): lr_search (LR up to 1, no warm-up: early
blow-ups), lr_sensitivity (warm-up 10%), width_scaling and gpt_vs_llama2 (no clipping, weight
decay 1e-4 independent of the LR: DESIGN.md's second pilot), and calm references at LRs where
both recipes learn. All use the 8k sample tokenizer (loss at init ~ln 8192 = 9.0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
REAL_DIR = Path(__file__).parent / "real"

COLUMNS = ("step", "loss", "grad_norm", "lr", "attn_logit_max", "logsumexp_mean",
           "update_ratio_max")
"""What a compact trace keeps: the keys the default detectors (and ``normalize_by="lr"``) read."""

UNSTABLE = ("optim.clip_grad=0", "optim.weight_decay=1e-4",
            "optim.weight_decay_lr_independent=true")
"""The second pilot's regime (DESIGN.md): no clipping, weight decay 1e-4 independent of the LR."""

BASE = ("size=tiny", "trainer.train_steps=200")
"""tiny: d=64, 2 layers, 4 heads, sequence 128, batch 8, the 8k sample tokenizer; clip 1.0 and
coupled weight decay 0.1 unless a config says otherwise; cosine over the 200 steps."""

D128 = ("model.hidden_size=128", "model.num_layers=4", "optim.decay_steps=800")

CONFIGS: dict[str, tuple[str, ...]] = {
    # like the lr_search study (LR up to 1, warm-up 0-40 steps): early blow-ups
    "gpt-lr1-w0": ("recipe=gpt", *BASE, "optim.lr=1.0", "optim.warmup_steps=0"),
    "llama2-lr1-w0": ("recipe=llama2", *BASE, "optim.lr=1.0", "optim.warmup_steps=0"),
    "gpt-lr0.3-w0": ("recipe=gpt", *BASE, "optim.lr=0.3", "optim.warmup_steps=0"),
    "llama2-lr0.3-w0": ("recipe=llama2", *BASE, "optim.lr=0.3", "optim.warmup_steps=0"),
    "gpt-lr0.1-w0": ("recipe=gpt", *BASE, "optim.lr=0.1", "optim.warmup_steps=0"),
    "llama2-lr0.1-w0": ("recipe=llama2", *BASE, "optim.lr=0.1", "optim.warmup_steps=0"),
    "gpt-lr0.03-w0": ("recipe=gpt", *BASE, "optim.lr=0.03", "optim.warmup_steps=0"),
    "llama2-lr0.03-w0": ("recipe=llama2", *BASE, "optim.lr=0.03", "optim.warmup_steps=0"),
    # like lr_sensitivity (warm-up 10%) and width_scaling (GPT, no clipping, wd 1e-4 LR-indep.)
    "gpt-lr0.3-w20": ("recipe=gpt", *BASE, "optim.lr=0.3", "optim.warmup_steps=20"),
    "llama2-lr0.3-w20": ("recipe=llama2", *BASE, "optim.lr=0.3", "optim.warmup_steps=20"),
    "gpt-d128-noclip-lr0.3-w20": ("recipe=gpt", *BASE, "model.hidden_size=128", *UNSTABLE,
                                  "optim.lr=0.3", "optim.warmup_steps=20"),
    # like gpt_vs_llama2 (d=128, 4 layers, LR 0.3, warm-up 40 of an 800-step cosine)
    "gpt-d128l4-lr0.3-w40": ("recipe=gpt", *BASE, *D128, *UNSTABLE, "optim.lr=0.3",
                             "optim.warmup_steps=40"),
    "llama2-d128l4-lr0.3-w40": ("recipe=llama2", *BASE, *D128, *UNSTABLE, "optim.lr=0.3",
                                "optim.warmup_steps=40"),
    # calm references: LRs where both recipes learn
    "llama2-lr0.003-w20": ("recipe=llama2", *BASE, "optim.lr=0.003", "optim.warmup_steps=20"),
    "llama2-lr0.03-w20": ("recipe=llama2", *BASE, "optim.lr=0.03", "optim.warmup_steps=20"),
    "gpt-lr0.01-w20": ("recipe=gpt", *BASE, "optim.lr=0.01", "optim.warmup_steps=20"),
}

SPLITS: dict[str, list[tuple[str, int]]] = {
    # looked at while the early-training rules were designed (curves and detector output)
    "dev": [("gpt-lr1-w0", 101), ("llama2-lr1-w0", 101), ("gpt-lr0.3-w0", 101),
            ("gpt-lr0.3-w20", 101), ("llama2-lr0.03-w20", 101), ("gpt-lr0.1-w0", 101),
            ("llama2-lr0.1-w0", 101), ("gpt-lr0.03-w0", 101)],
    # held out: generated and labelled once, scored with the final rules only
    "heldout": [(c, 1) for c in CONFIGS]
    + [(c, 2) for c in ("gpt-lr0.1-w0", "gpt-lr0.03-w0", "llama2-lr0.03-w0", "llama2-lr0.3-w20",
                        "gpt-d128l4-lr0.3-w40", "llama2-lr0.003-w20", "gpt-lr0.01-w20")],
    # held out from the second detector revision (2026-12-01): every config at a new seed,
    # generated and labelled after that revision was scored, scored with its rules once
    "heldout2": [(c, 3) for c in CONFIGS],
}
"""Runs per split: (config, seed). Held-out runs are 150 steps (``HELDOUT_STEPS``) to fit the
CPU budget; blow-ups in these regimes start before step ~120."""

HELDOUT_STEPS = 150


def run_name(config: str, seed: int) -> str:
    return f"{config}-s{seed}"


def compact(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Only :data:`COLUMNS`, floats to 6 significant digits (NaN/Inf kept)."""
    out = []
    for r in rows:
        c: dict[str, Any] = {}
        for k in COLUMNS:
            v = r.get(k)
            if isinstance(v, float) and math.isfinite(v):
                v = float(f"{v:.6g}")
            if v is not None:
                c[k] = v
        out.append(c)
    return out


def generate(split: str, python: str = sys.executable) -> None:
    """Train the split's runs one after another and write their compact traces."""
    from stability.detectors import read_metrics

    folder = REAL_DIR / split
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for config, seed in SPLITS[split]:
        name = run_name(config, seed)
        target = folder / f"{name}.jsonl"
        if target.exists():
            continue
        steps = [f"trainer.train_steps={HELDOUT_STEPS}"] if split.startswith("heldout") else []
        with tempfile.TemporaryDirectory() as tmp:
            overrides = [o for o in CONFIGS[config]
                         if not (steps and o.startswith("trainer.train_steps"))]
            cmd = ["nice", "-n", "10", python, "-m", "stability.train", *overrides, *steps,
                   f"trainer.seed={seed}", "trainer.threads=1", "detectors=none",
                   "checkpoint.interval=0", "checkpoint.save_final=false",
                   "logger.console=false", "logger.wandb.mode=disabled", f"hydra.run.dir={tmp}"]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{name}: {proc.stderr[-2000:]}")
            rows = compact(list(read_metrics(Path(tmp) / "metrics.jsonl")))
        with target.open("w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"{name}: {len(rows)} rows", flush=True)


# --- the label rule (loss only; see real/README.md) ------------------------------------------

DIP = 0.10
"""A run has learned once its loss (5-row centred median) is this far below the loss at init."""
BUMP = 0.15
"""A bump: the 3-row centred median this far above the running bottom (5-row medians so far)."""
BUMP_END = 0.05
"""A bump ends when the 3-row centred median is back within this of that bottom."""
MOVE = 0.25
"""A blow-up's loss "moves" (its onset) once it has given back this share of what it had
learned (L0 - bottom), for good: every 3-row median from there to the crossing is above it."""
BLOWUP_BEFORE = 40
"""Steps before a blow-up's onset that still belong to it (leading warnings)."""
BUMP_BEFORE = 10
"""Steps before a bump's onset that still belong to it."""
TAIL = 20
"""Steps after a bump's end (or a from-start incident's first dip) that still belong to it."""
JUMP = 0.30
"""A one-row jump (added 2026-12-01): a row this far above the median of the 4 rows around it
(2 before, 2 after), outside every other incident's window: a loss spike of one step, which
the 3- and 5-row medians of the other rules cannot see."""
JUMP_TAIL = 10
"""Steps after a jump that still belong to it."""
FROM_START = 0.05
"""Before it has learned, a run is unstable from the start once the loss is this far above the
loss at init (a slow start sits at the loss at init, within a hair, for its first rows)."""


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _centred(loss: Sequence[float], i: int, half: int) -> float:
    lo, hi = max(0, i - half), min(len(loss), i + half + 1)
    return _median(loss[lo:hi])


def _above_init(loss: Sequence[float], i: int, l0: float, margin: float = 0.0) -> bool:
    """Row ``i`` is above the loss at init (times ``1 + margin``), and so is the median of it
    and the next 4 rows."""
    level = l0 * (1 + margin)
    return loss[i] > level and _median(loss[i : i + 5]) > level


def label_run(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Incidents of one real run, from its loss curve alone (the rule of real/README.md).

    Returns ``{"incidents": [...], "init_loss"}``; every incident has ``kind``, ``shape``
    (``blow-up``, ``from-start``, ``bump``, ``jump``, ``nonfinite``), ``onset``, ``start``,
    ``end`` and,
    for a blow-up, ``cross`` (the step its loss passes the loss at init).
    """
    steps = [int(r["step"]) for r in rows]
    first_bad = next((i for i, r in enumerate(rows)
                      if not all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k])
                                 for k in ("loss", "grad_norm"))), None)
    m = len(rows) if first_bad is None else first_bad
    loss = [float(r["loss"]) for r in rows[:m]]
    l0 = loss[0]
    med5 = [_centred(loss, i, 2) for i in range(m)]
    med3 = [_centred(loss, i, 1) for i in range(m)]
    incidents: list[dict[str, Any]] = []
    last = len(rows) - 1

    dip = next((i for i in range(m) if med5[i] <= (1 - DIP) * l0), None)
    learned_from = 0
    # unstable from the start: above the loss at init before the loss ever dipped
    early = next((i for i in range(1, dip if dip is not None else m)
                  if _above_init(loss, i, l0, FROM_START)), None)
    if early is not None:
        end = last if dip is None else min(last, dip + TAIL)
        incidents.append({"kind": "spike", "shape": "from-start", "onset": steps[early],
                          "start": steps[0], "end": steps[end], "cross": steps[early]})
        learned_from = end + 1

    # blow-up: after the dip, a row above L0 with the median of the next 5 rows above L0
    blow_start = m
    if dip is not None:
        cross = next((i for i in range(max(dip, learned_from), m) if _above_init(loss, i, l0)),
                     None)
        if cross is not None:
            bottom = min(med5[dip:cross])
            level = bottom + MOVE * (l0 - bottom)
            onset = cross
            while onset - 1 > max(dip, learned_from) and med3[onset - 1] >= level:
                onset -= 1
            blow_start = max(learned_from, onset - BLOWUP_BEFORE)
            incidents.append({"kind": "spike", "shape": "blow-up", "onset": steps[onset],
                              "start": steps[blow_start], "end": steps[last],
                              "cross": steps[cross]})

    # bumps between the dip (or the end of a from-start incident) and the blow-up's window
    i = max(dip, learned_from) if dip is not None else m
    while i < blow_start:
        bottom = min(med5[dip : max(dip + 1, i - 2)])
        if med3[i] >= (1 + BUMP) * bottom:
            j = i
            while j + 1 < m and med3[j + 1] > (1 + BUMP_END) * bottom:
                j += 1
            bump = {"kind": "spike", "shape": "bump", "onset": steps[i],
                    "start": steps[max(learned_from, i - BUMP_BEFORE)],
                    "end": steps[min(last, j + TAIL)]}
            if j + TAIL >= blow_start and blow_start < m:  # runs into the blow-up: part of it
                blow = next(d for d in incidents if d["shape"] == "blow-up")
                blow["start"] = min(blow["start"], bump["start"])
                break
            incidents.append(bump)
            i = j + 1
        else:
            i += 1
    # one-row jumps outside every window so far (after the first 3 rows: the loss at init)
    for i in range(3, m - 2):
        around = _median([*loss[i - 2 : i], *loss[i + 1 : i + 3]])
        inside = any(d["start"] <= steps[i] <= d["end"] for d in incidents)
        if loss[i] >= (1 + JUMP) * around and not inside:
            incidents.append({"kind": "spike", "shape": "jump", "onset": steps[i],
                              "start": steps[i], "end": steps[min(last, i + JUMP_TAIL)]})
    if first_bad is not None and not any(d["end"] >= steps[first_bad] for d in incidents):
        incidents.append({"kind": "nonfinite", "shape": "nonfinite", "onset": steps[first_bad],
                          "start": steps[first_bad], "end": steps[last]})
    incidents.sort(key=lambda d: d["onset"])
    return {"incidents": incidents, "init_loss": l0}


def label(folder: Path = REAL_DIR) -> dict[str, Any]:
    """Label every ``<split>/*.jsonl`` under ``folder``; write ``labels.json``."""
    from stability.detectors import read_metrics

    labels: dict[str, Any] = {}
    for path in sorted(folder.glob("*/*.jsonl")):
        lab = label_run(list(read_metrics(path)))
        lab["split"] = path.parent.name
        labels[f"{path.parent.name}/{path.name}"] = lab
    (folder / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    return labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.detectors.real_runs",
                                description=__doc__)
    p.add_argument("command", choices=["generate", "label"])
    p.add_argument("--split", choices=list(SPLITS), default="heldout")
    a = p.parse_args(argv)
    if a.command == "generate":
        generate(a.split)
    else:
        for name, lab in label().items():
            kinds = ", ".join(f"{d['shape']}@{d['onset']}" for d in lab["incidents"]) or "calm"
            print(f"{name}: {kinds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
