"""Fault injection (``fault.*``), so that every detector and action is tested on real runs.

- ``lr_spike``: the LR is multiplied by ``magnitude`` for ``duration`` steps;
- ``bad_batch``: the batch's tokens are replaced by uniform random tokens (a corrupted shard);
- ``nan``: the loss is NaN, so every gradient is NaN.

A fault fires once per run: a rollback replays its steps without it, as a transient fault would
(its record is not restored by a rollback; a resume restores it).
"""

from __future__ import annotations

import dataclasses

import torch

from stability.callbacks import Callback, StepState
from stability.model.loss import LossOutput
from stability.watch.config import FaultConfig


class FaultInjector(Callback):
    """Enters the run where a fault of its kind would: the LR, a batch, or the loss."""

    name = "fault"
    restore_on_rollback = False

    def __init__(self, cfg: FaultConfig) -> None:
        self.cfg = cfg
        self.done = False
        """Set once the fault's last step has passed."""

    def active(self, step: int) -> bool:
        """Is the fault on during (1-based) step ``step``?"""
        at = self.cfg.at_step
        return at is not None and not self.done and at <= step < at + self.cfg.duration

    def on_step_start(self, state: StepState) -> None:
        # After the scheduler set this step's LR.
        if self.active(state.step + 1) and self.cfg.kind == "lr_spike":
            for group in state.optimizer.param_groups:
                group["lr"] *= self.cfg.magnitude

    def on_batch(self, state: StepState, batch: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        step = state.step + 1
        if not (self.active(step) and self.cfg.kind == "bad_batch"):
            return batch
        generator = torch.Generator().manual_seed(step)
        noise = torch.randint(0, state.vocab_size, batch["tokens"].shape, generator=generator)
        return {**batch, "tokens": noise.to(batch["tokens"]),
                "labels": noise.roll(-1, dims=-1).to(batch["labels"])}

    def on_loss(self, state: StepState, out: LossOutput) -> LossOutput:
        if self.active(state.step + 1) and self.cfg.kind == "nan":
            nan = float("nan")
            return dataclasses.replace(out, loss=out.loss * nan,
                                       cross_entropy=out.cross_entropy * nan)
        return out

    def on_step_end(self, state: StepState) -> None:
        at = self.cfg.at_step
        if at is not None and state.step >= at + self.cfg.duration - 1:
            self.done = True

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = bool(state["done"])
