"""Checkpoints: saved atomically and durably, loaded safely, resumed from the newest intact one.

Layout under ``<run_dir>/checkpoints/``::

    step_00000040/rank_00000.pt   this rank's state: model shard, optimizer, scheduler step, RNG,
    step_00000040/rank_00001.pt   data position, callbacks' state, counters (one file per rank)
    step_00000040/config.yaml     the resolved config the run used up to this step
    step_00000040/meta.json       step, parallel layout, every file's size; written last

**Saving.** Every rank writes into ``.tmp-step_…`` and fsyncs its file; after a barrier rank 0
writes config.yaml and meta.json, fsyncs the folder, renames it to ``step_…`` and fsyncs
``checkpoints/``. A rename is atomic, so a kill at any moment leaves the previous checkpoint or
the new one, never half of one. Old checkpoints (beyond ``checkpoint.keep_last``, and never one
newer than the one just written) are first renamed to ``.trash-…`` and then deleted, so a kill
mid-delete never leaves a partial ``step_…`` folder; leftovers are removed at the next save.

**Loading.** ``torch.load(..., weights_only=True, map_location="cpu")``: a checkpoint file can
hold tensors, numbers, strings and containers of them, and nothing that runs code when loaded
(RNG states are stored as tensors). Loading to the CPU and copying into the model keeps RNG
states on the host, where ``set_rng_state`` needs them, on a GPU too.

**Falling back.** A checkpoint is intact when its meta.json parses and lists files that exist
with the sizes it recorded, and every rank's file loads. The newest intact one is used; each
damaged one newer than it is named in a warning. When checkpoints exist and none is intact the
run stops with a one-line :class:`RunError`, and nothing is deleted.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import random as mcore_random

from stability.errors import RunError
from stability.runfiles import fsync_dir, write_atomic

log = logging.getLogger(__name__)

_PREFIX = "step_"
FORMAT = 2
"""meta.json's ``format``: 2 = weights-only files with per-file sizes (this module)."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{_PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    return int(path.name[len(_PREFIX):])


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints whose save finished (those with meta.json), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()
             and (p / "meta.json").exists()]
    return sorted(found, key=step_of)


def damage(path: Path) -> str | None:
    """What is wrong with the checkpoint folder ``path`` by its metadata, or None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        return f"meta.json cannot be read ({error})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return "written by an older version of stability (no weights-only format)"
    if "config.yaml" not in meta.get("files", {}):
        return "config.yaml is missing"
    for name, size in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


@dataclass(frozen=True)
class Candidate:
    """A checkpoint that looks intact by its metadata."""

    path: Path
    step: int

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"


def candidates(root: Path, max_step: int | None = None) -> tuple[list[Candidate], list[str]]:
    """Checkpoints at or before ``max_step`` that look intact, newest first, and one line for
    each that does not."""
    found, damaged = [], []
    for path in reversed(complete_checkpoints(root)):
        if max_step is not None and step_of(path) > max_step:
            continue
        problem = damage(path)
        if problem is None:
            found.append(Candidate(path, step_of(path)))
        else:
            damaged.append(f"{path}: {problem}")
    return found, damaged


# ---------------------------------------------------------------------- RNG state as tensors
def rng_state(device_type: str) -> dict[str, Any]:
    """Every random stream the run draws from, as tensors and numbers (weights-only safe)."""
    version, keys, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(keys, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "tracker": mcore_random.get_cuda_rng_tracker().get_states(),
    }
    if device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], device_type: str) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    mcore_random.get_cuda_rng_tracker().set_states(
        {name: s.cpu() for name, s in state["tracker"].items()})
    if "cuda" in state and device_type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu())


# ---------------------------------------------------------------------- save and load
class Checkpointer:
    """Saves and restores one run's checkpoints; owns the rollback bookkeeping.

    Args:
        root: ``<run_dir>/checkpoints``.
        keep_last: Complete checkpoints kept.
        rank: This process's global rank (rank 0 writes the shared files).
        world_size: Processes that save together (a save is collective).
        device: The device of a collective's flag tensor (NCCL needs CUDA tensors).
        layout: The parallel layout, recorded in meta.json and checked on load.
    """

    def __init__(self, root: Path, keep_last: int, rank: int, world_size: int,
                 device: torch.device, layout: dict[str, int]) -> None:
        self.root = root
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.layout = layout
        self.last_saved: int | None = None
        self.rollbacks = 0

    @classmethod
    def of(cls, root: Path, keep_last: int, topology: Any) -> Checkpointer:
        """The checkpointer of a rank in a ``stability.parallel.Topology``."""
        return cls(root, keep_last, topology.launch.rank, topology.launch.world_size,
                   topology.device, topology.layout)

    # ------------------------------------------------------------------ save
    def save(self, state: dict[str, Any], step: int, config_yaml: str) -> Path:
        """Write ``state`` (this rank's) as the checkpoint of ``step``; collective."""
        final = step_dir(self.root, step)
        tmp = self.root / f".tmp-{final.name}"
        if self.rank == 0:
            self._remove_leftovers()
            tmp.mkdir(parents=True, exist_ok=True)
        self._barrier()
        name = f"rank_{self.rank:05d}.pt"
        with (tmp / name).open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        self._barrier()
        if self.rank == 0:
            write_atomic(tmp / "config.yaml", config_yaml)
            files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.name != "meta.json"}
            meta = {"format": FORMAT, "step": step, "layout": self.layout, "files": files}
            write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
            fsync_dir(tmp)
            if final.exists():  # the same step saved again (after a rollback): the new wins
                self._discard(final)
            tmp.rename(final)
            fsync_dir(self.root)
            older = [p for p in complete_checkpoints(self.root) if step_of(p) < step]
            for old in older[:max(len(older) - (self.keep_last - 1), 0)]:
                self._discard(old)
        self._barrier()
        self.last_saved = step
        return final

    def discard_after(self, step: int) -> None:
        """Remove the checkpoints after ``step`` (a rollback abandoned them: resuming from
        one would continue the trajectory the rollback left); collective."""
        if self.rank == 0:
            for path in complete_checkpoints(self.root):
                if step_of(path) > step:
                    self._discard(path)
        self._barrier()

    def _discard(self, path: Path) -> None:
        """Rename aside, then delete: a kill in between leaves no partial step folder."""
        trash = path.with_name(f".trash-{path.name}")
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        path.rename(trash)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        for stale in [*self.root.glob(".tmp-*"), *self.root.glob(".trash-*")]:
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, max_step: int | None = None) -> tuple[Candidate, dict[str, Any]] | None:
        """This rank's state of the newest intact checkpoint (at or before ``max_step``),
        falling back past damaged ones with a warning for each; None when there is no
        checkpoint at all. Every rank ends with the same checkpoint.

        Raises:
            RunError: Checkpoints exist but none is intact, or their layout is another.
        """
        found, damaged = candidates(self.root, max_step)
        for candidate in found:
            state, problem = self._read(candidate)
            if self._any_rank(problem is not None):
                damaged.append(f"{candidate.path}: {problem or 'another rank could not load'}")
                continue
            meta = json.loads((candidate.path / "meta.json").read_text())
            if meta["layout"] != self.layout:
                raise RunError(f"checkpoint {candidate.path} was written with the parallel "
                               f"layout {meta['layout']}; this run has {self.layout}")
            for line in damaged:
                log.warning("skipping a damaged checkpoint: %s", line)
            self.last_saved = candidate.step  # saving this step again would change nothing
            return candidate, state
        if damaged:
            raise RunError(f"no intact checkpoint to resume from; newest: {damaged[0]}")
        return None

    def _read(self, candidate: Candidate) -> tuple[dict[str, Any] | None, str | None]:
        path = candidate.path / f"rank_{self.rank:05d}.pt"
        if not path.is_file():
            return None, f"{path.name} is missing"
        try:
            return torch.load(path, map_location="cpu", weights_only=True), None
        except pickle.UnpicklingError as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            return None, (f"{path.name} needs more than tensors, numbers and strings to load, "
                          f"refused (weights_only): {first}")
        except (RuntimeError, EOFError, OSError, ValueError) as error:
            return None, f"{path.name} cannot be read ({type(error).__name__}: {error})"

    # ------------------------------------------------------------------ collectives
    def _any_rank(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def _barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
