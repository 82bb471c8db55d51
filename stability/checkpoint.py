"""Checkpoints: save atomically, resume from the latest complete one.

Layout under ``<run_dir>/checkpoints/``::

    step_00000040/rank_00000.pt   model shard, optimizer, scheduler, RNG, data position,
    step_00000040/rank_00001.pt   callbacks' state, counters (one file per rank)
    step_00000040/meta.json       step and parallel layout; written last

Every rank writes into ``.tmp-step_…``; after a barrier rank 0 writes ``meta.json`` and renames
the folder. A rename is atomic, so a kill at any moment leaves either the previous checkpoint
or the new one, never half of one; leftovers of an interrupted save are removed at the next.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import random as mcore_random

from stability.callbacks import Callback
from stability.errors import ConfigError

_PREFIX = "step_"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"{_PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (those with meta.json), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def rng_state() -> dict[str, Any]:
    """Every random stream the run draws from."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": mcore_random.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    mcore_random.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _layout(trainer) -> dict[str, int]:
    t = trainer.topology
    return {"world_size": t.launch.world_size, "tensor": t.tp_size, "pipeline": t.pp_size,
            "data": t.dp_size}


def save(trainer, root: Path, keep_last: int) -> Path:
    """Write a checkpoint of ``trainer`` at its current step (collective over all ranks)."""
    step = trainer.step
    final = _step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    rank = trainer.topology.launch.rank
    if trainer.topology.is_main:
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    _barrier()
    torch.save(trainer.state_dict(), tmp / f"rank_{rank:05d}.pt")
    _barrier()
    if trainer.topology.is_main:
        meta = {"step": step, "layout": _layout(trainer)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():  # a re-save of the same step (resumed exactly at it)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_latest(trainer, root: Path, max_step: int | None = None) -> int | None:
    """Load the latest complete checkpoint (at or before ``max_step``) into ``trainer``.

    Returns its step, or None when there is none (the trainer is then untouched).
    """
    found = [p for p in complete_checkpoints(root)
             if max_step is None or int(p.name[len(_PREFIX):]) <= max_step]
    if not found:
        return None
    latest = found[-1]
    meta = json.loads((latest / "meta.json").read_text())
    if meta["layout"] != _layout(trainer):
        raise ConfigError("parallel layout", _layout(trainer),
                          f"the layout of the checkpoint {latest}: {meta['layout']}")
    path = latest / f"rank_{trainer.topology.launch.rank:05d}.pt"
    trainer.load_state_dict(torch.load(path, map_location=trainer.device, weights_only=False))
    return meta["step"]


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class Checkpointer(Callback):
    """Saves every ``interval`` steps and on close (when asked to)."""

    name = "checkpointer"

    def __init__(self, root: Path, interval: int, keep_last: int, save_final: bool) -> None:
        self.root = root
        self.interval = interval
        self.keep_last = keep_last
        self.save_final = save_final
        self.last_saved: int | None = None

    def on_step_end(self, trainer) -> None:
        if self.interval and trainer.step % self.interval == 0:
            self.save(trainer)

    def save(self, trainer) -> None:
        """Flush pending metrics first, so the files and the checkpoint agree on the step."""
        if self.last_saved == trainer.step:
            return
        trainer.flush_metrics()
        save(trainer, self.root, self.keep_last)
        self.last_saved = trainer.step

    def on_close(self, trainer, status) -> None:
        if (self.save_final and status == "completed") or status == "stopped":
            self.save(trainer)
