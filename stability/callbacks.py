"""The one interface through which sinks, detectors and checkpointing plug into the loop.

Hooks, in the order the loop calls them::

    on_train_start(trainer)                 once, before any checkpoint is loaded
    on_restore(trainer, reason)             state was loaded ("resume" or "rollback"), or a
                                            fresh start found none ("resume", step 0)
    on_step_start(trainer)                  before the forward passes of a step
    before_optimizer_step(trainer)          gradients are final (reduced and clipped)
    on_step_end(trainer)                    the optimizer stepped; trainer.step is the new count
    on_metrics(trainer, rows)               a batch of metric rows moved to the host
    on_events(trainer, events)              detector events (events.jsonl rows), with actions
    on_close(trainer, status)               once, at the end (completed | stopped | diverged)

Device-side decisions (skip a step) happen in ``before_optimizer_step`` without host syncs;
decisions that need numbers on the host happen in ``on_metrics``. A callback's
``state_dict``/``load_state_dict`` is saved in every checkpoint, so its history survives resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stability.train import Trainer


class Callback:
    """Base class: every hook is optional."""

    name: str = "callback"
    """Key of this callback's state in checkpoints."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Model, optimizer and data exist; no checkpoint has been loaded yet."""

    def on_restore(self, trainer: Trainer, reason: str) -> None:
        """``trainer.step`` is where the run continues from; files are cut back to it."""

    def on_step_start(self, trainer: Trainer) -> None:
        """Before the forward passes of step ``trainer.step + 1``."""

    def before_optimizer_step(self, trainer: Trainer) -> None:
        """Gradients are reduced over data parallel and clipped; the optimizer has not run."""

    def on_step_end(self, trainer: Trainer) -> None:
        """The optimizer stepped; ``trainer.step`` counts completed steps."""

    def on_metrics(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        """Metric rows (one per logged step, host floats) since the last flush."""

    def on_events(self, trainer: Trainer, events: list[dict[str, Any]]) -> None:
        """Detector events, one dict per events.jsonl row (``action`` filled in)."""

    def on_close(self, trainer: Trainer, status: str) -> None:
        """The run ends with ``status``; write what must be written."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (JSON-friendly where possible)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``'s output."""
