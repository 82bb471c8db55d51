"""Fixtures for the analysis tests: synthetic run directories in the contract format.

Tests use the helpers through fixtures (never ``import conftest``: another test folder's
conftest could shadow the name).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # so that `import analysis` works however pytest is started
    sys.path.insert(0, str(REPO))
os.environ.setdefault("MPLBACKEND", "Agg")


def config_for(lr: float, seed: int = 0, recipe: str = "gpt") -> dict[str, Any]:
    """A resolved config as the trainer writes it (nested, a subset of the keys)."""
    return {
        "recipe": recipe,
        "size": "tiny",
        "model": {
            "norm_type": "layernorm" if recipe == "gpt" else "rmsnorm",
            "norm_position": "pre",
            "scaled_embedding": recipe == "llama2",
            "qk_layernorm": False,
            "hidden_size": 128,
            "num_layers": 4,
        },
        "loss": {"z_loss": 0.0},
        "optim": {
            "lr": lr,
            "min_lr": lr / 10,
            "warmup_steps": 4,
            "eps": 1e-8,
            "betas": [0.9, 0.95],
        },
        # not the sample corpus: no n-gram levels, so grid metrics use the final training
        # loss capped at the loss at init (tests of held-out metrics set their own data)
        "data": {"name": "indexed", "seq_length": 128},
        "trainer": {"train_steps": 100, "seed": seed, "global_batch_size": 8},
    }


def write_run(
    run_dir: Path,
    losses: Sequence[float],
    *,
    config: dict[str, Any] | None = None,
    overrides: Sequence[str] | None = None,
    events: Sequence[dict[str, Any]] = (),
    summary: dict[str, Any] | None = None,
    with_summary: bool = True,
    truncate: bool = False,
    first_step: int = 1,
    extra: dict[str, Sequence[float]] | None = None,
) -> Path:
    """Write a run directory exactly as the contract says (json.dumps writes NaN/Infinity).

    Args:
        run_dir: Directory to create.
        losses: One loss per logged step, steps ``first_step, first_step + 1, ...``.
        config: Resolved config (default: ``config_for(1e-3)``).
        overrides: Written to ``.hydra/overrides.yaml`` when given.
        events: Lines of ``events.jsonl``.
        summary: ``summary.json`` content (default: completed, final loss = last loss).
        with_summary: False leaves ``summary.json`` out (a crashed or running run).
        truncate: Append a half-written last line (a killed run).
        first_step: Step of the first record.
        extra: More per-step metric series (e.g. ``attn_logit_max``).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config = config or config_for(1e-3)
    lines = []
    for i, loss in enumerate(losses):
        record = {
            "step": first_step + i,
            "loss": loss,
            "grad_norm": 1.0 if math.isfinite(loss) else loss,
            "lr": config["optim"]["lr"],
            "tokens": (first_step + i) * 1024,
            "time": 0.1 * i,
        }
        for key, series in (extra or {}).items():
            record[key] = series[i]
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n"
    if truncate:
        text += f'{{"step": {first_step + len(losses)}, "loss": 2.'
    (run_dir / "metrics.jsonl").write_text(text)
    (run_dir / "config.yaml").write_text(_yaml(config))
    if overrides is not None:
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if events:
        (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if with_summary:
        default = {"status": "completed", "final_loss": losses[-1], "steps": len(losses)}
        (run_dir / "summary.json").write_text(json.dumps(summary or default))
    return run_dir


def _yaml(config: dict[str, Any], indent: int = 0) -> str:
    """Minimal YAML writer (what OmegaConf.to_yaml writes for these types)."""
    out = []
    for key, value in config.items():
        pad = "  " * indent
        if isinstance(value, dict):
            out.append(f"{pad}{key}:\n{_yaml(value, indent + 1)}")
        elif isinstance(value, list):
            out.append(f"{pad}{key}:\n" + "".join(f"{pad}- {v}\n" for v in value))
        elif isinstance(value, bool):
            out.append(f"{pad}{key}: {str(value).lower()}\n")
        else:
            out.append(f"{pad}{key}: {value}\n")
    return "".join(out)


def event(step: int, detector: str = "zscore", kind: str = "spike") -> dict[str, Any]:
    """One events.jsonl record."""
    return {
        "step": step,
        "detector": detector,
        "metric": "loss",
        "value": 9.0,
        "threshold": 4.0,
        "score": 12.0,
        "severity": "warning",
        "kind": kind,
        "action": "log",
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A multirun sweep dir: LR grid x 2 seeds, one NaN run, one killed run, one still running.

    Subdirs 0..5: lr in (1e-3, 1e-2, 1e-1) x seed in (0, 1). lr=0.1 seed 1 goes NaN; lr=0.1
    seed 0 ends above its init loss. Run 1 has a truncated last line. Run 3 has no summary.
    """
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    finals = {1e-3: 3.0, 1e-2: 2.5, 1e-1: 6.0}
    job = 0
    for lr in (1e-3, 1e-2, 1e-1):
        for seed in (0, 1):
            losses = [5.0] + [finals[lr]] * 29
            if lr == 1e-1 and seed == 1:
                losses = [5.0, 4.0, 3.9, math.nan, math.nan]
            write_run(
                root / str(job),
                losses,
                config=config_for(lr, seed),
                overrides=[f"optim.lr={lr}", f"trainer.seed={seed}", "recipe=gpt"],
                events=[event(10), event(11, "grad"), event(60)] if job == 2 else (),
                with_summary=job != 3,
                truncate=job == 1,
                summary={"status": "diverged", "final_loss": math.nan, "steps": 4}
                if losses[-1] != losses[-1]
                else None,
            )
            job += 1
    return root


@pytest.fixture
def make_run() -> Callable[..., Path]:
    """:func:`write_run`, for tests that need their own layout."""
    return write_run


@pytest.fixture
def make_config() -> Callable[..., dict[str, Any]]:
    """:func:`config_for`: a resolved config for an LR, seed and recipe."""
    return config_for


@pytest.fixture
def make_event() -> Callable[..., dict[str, Any]]:
    """:func:`event`: one events.jsonl record."""
    return event
