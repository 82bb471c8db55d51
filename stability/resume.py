"""What running a command again on a run directory does.

- A finished run (``completed``, ``diverged`` or ``stopped`` in summary.json) is left alone: the
  command says so in one line and returns the stored summary, so Hydra and Optuna get the stored
  objective. A completed run whose ``trainer.train_steps`` was raised continues instead.
- ``checkpoint.resume=never`` on a directory that already holds a run is refused.
- Otherwise the run resumes from its newest intact checkpoint (``stability.checkpoint``), and
  the config it is given is compared with the config that checkpoint was written with. A key
  that fixes what the checkpoint holds (:data:`FIXED`: the model's shape, the data, the seed,
  the batch, the parallel layout, the device and precision) is refused in one line naming it.
  Every other change is applied from the resume on, and recorded: a log line per key
  (``resume at step 40: optim.lr 0.0001 -> 0.001``), the previous config.yaml kept as
  ``config.resume-<step>.yaml``, and config.yaml rewritten with what the run now uses.

How an applied change acts: the LR schedule is recomputed from the new ``optim.*`` and
``trainer.train_steps`` at the saved step (Megatron's ``--override-opt_param-scheduler``), so a
longer run stretches the decay from there on; betas and eps are set on the restored optimizer;
loss, monitor, detector, action, checkpoint and logger settings take effect at the next step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from stability.config import Config, to_dict, to_yaml
from stability.errors import RunError
from stability.runfiles import FINISHED, RunFiles, write_atomic

log = logging.getLogger(__name__)

FIXED = ("model.", "data.", "parallel.", "trainer.seed", "trainer.global_batch_size",
         "trainer.micro_batch_size", "trainer.device", "trainer.precision", "optim.distributed",
         "optim.embedding_weight_decay")
"""Keys (and prefixes ending in ".") a resume cannot change: the checkpoint's tensors, data
position and random streams were made under them."""

CHANGEABLE = ("model.attention_backend", "model.cpu_initialization", "data.num_workers",
              "data.cache_dir")
"""Exceptions to :data:`FIXED`: the same computation by other means."""


@dataclass(frozen=True)
class Change:
    """One config key that differs from the checkpoint's."""

    key: str
    old: Any
    new: Any

    @property
    def fixed(self) -> bool:
        return self.key not in CHANGEABLE and any(
            self.key == f or (f.endswith(".") and self.key.startswith(f)) for f in FIXED)

    def __str__(self) -> str:
        return f"{self.key} {self.old!r} -> {self.new!r}"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}`` (lists and empty dicts stay
    values)."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every key of ``new`` whose value differs from ``old``'s, sorted. A key ``old`` lacks
    (added to the schema since) counts as its default; a key the schema lost is ignored."""
    a, b = flatten(old), flatten(new)
    defaults = flatten(to_dict(Config()))
    return [Change(key, a.get(key, defaults.get(key)), b[key]) for key in sorted(b)
            if a.get(key, defaults.get(key)) != b[key]]


def read_config(path: Path) -> dict[str, Any]:
    """A config.yaml as nested dicts."""
    return OmegaConf.to_container(OmegaConf.load(path))


def check(found: list[Change], where: Path) -> None:
    """Raise RunError naming the first change a resume cannot make."""
    for change in found:
        if change.fixed:
            raise RunError(f"{change.key} cannot change when a run resumes ({change.old!r} in "
                           f"{where}, {change.new!r} now); use a new run directory")


def finished(files: RunFiles, cfg: Config) -> dict[str, Any] | None:
    """The stored summary of a run that has nothing left to do, or None."""
    summary = files.read_summary()
    if summary is None or summary.get("status") not in FINISHED:
        return None
    if summary["status"] == "completed" and cfg.trainer.train_steps > summary.get("steps", 0):
        return None  # a longer run was asked for: continue it
    if files.config.exists():
        found = changes(read_config(files.config), to_dict(cfg))
        check(found, files.config)
        if found:
            log.warning("the run in %s is finished; not applied: %s", files.root,
                        ", ".join(str(c) for c in found))
    return summary


def refuse_overwrite(files: RunFiles, cfg: Config) -> None:
    """``checkpoint.resume=never`` must not train over a run that is already there."""
    if cfg.checkpoint.resume == "never" and files.holds_a_run():
        raise RunError(f"{files.root} already holds a run and checkpoint.resume=never would "
                       f"start over in it; use another run directory (hydra.run.dir=...), or "
                       f"checkpoint.resume=auto to continue it")


def record(files: RunFiles, cfg: Config, step: int, checkpoint_config: Path | None) -> None:
    """Write config.yaml for the run about to train; on a resume that changes keys, keep the
    previous one as ``config.resume-<step>.yaml`` and log each change (rank 0 calls this)."""
    files.root.mkdir(parents=True, exist_ok=True)
    if checkpoint_config is not None:
        found = changes(read_config(checkpoint_config), to_dict(cfg))
        check(found, checkpoint_config)
        if found:
            previous = files.config if files.config.exists() else checkpoint_config
            write_atomic(files.config_before_resume(step), previous.read_text())
            for change in found:
                log.warning("resume at step %d: %s", step, change)
    write_atomic(files.config, to_yaml(cfg))
