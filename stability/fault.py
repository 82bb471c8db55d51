"""Fault injection (``fault.*``), so that every detector and action is tested on real runs.

- ``lr_spike``: the LR is multiplied by ``magnitude`` for ``duration`` steps;
- ``bad_batch``: the batch's tokens are replaced by uniform random tokens (a corrupted shard);
- ``nan``: the loss is NaN, so every gradient is NaN.

A fault fires once per run: a rollback replays its steps without it, as a transient fault would.
"""

from __future__ import annotations

import torch

from stability.config import FaultConfig


class FaultInjector:
    """Asked by the loop at the few points where a fault can enter."""

    def __init__(self, cfg: FaultConfig) -> None:
        self.cfg = cfg
        self.done = False
        """Set once the fault's last step has passed; rollbacks do not reset it."""

    def active(self, step: int) -> bool:
        """Is the fault on during (1-based) step ``step``?"""
        at = self.cfg.at_step
        return at is not None and not self.done and at <= step < at + self.cfg.duration

    def step_started(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.active(step) and self.cfg.kind == "lr_spike":
            for group in optimizer.param_groups:
                group["lr"] *= self.cfg.magnitude

    def batch(self, step: int, batch: dict[str, torch.Tensor], vocab_size: int):
        if not (self.active(step) and self.cfg.kind == "bad_batch"):
            return batch
        generator = torch.Generator().manual_seed(step)
        noise = torch.randint(0, vocab_size, batch["tokens"].shape, generator=generator)
        return {**batch, "tokens": noise.to(batch["tokens"]),
                "labels": noise.roll(-1, dims=-1).to(batch["labels"])}

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self.active(step) and self.cfg.kind == "nan":
            return loss * float("nan")
        return loss

    def step_ended(self, step: int) -> None:
        at = self.cfg.at_step
        if at is not None and step >= at + self.cfg.duration - 1:
            self.done = True
