"""The one interface through which monitors, detectors, sinks and fault injection plug into the
loop, and the two objects they get: a narrow view of the step, and a control object.

Hooks, in the order the loop calls them (every hook is declared below; all are optional)::

    on_train_start(state)                   once: model, optimizer and data exist; nothing loaded
    on_restore(state, reason)               state.step is where the run continues: "resume" (a
                                            checkpoint was loaded, or a fresh start at step 0) or
                                            "rollback"; files are cut back to state.step here
    -- every step --
    on_step_start(state)                    before the forward passes of step state.step + 1
    on_batch(state, batch) -> batch         each micro batch before the model sees it
    on_loss(state, out) -> out              each micro batch's loss and its statistics
    before_optimizer_step(state, control)   gradients are final (reduced, clipped); state.loss
                                            and state.grad_norm are this step's device tensors
    on_step_end(state)                      the optimizer stepped; state.step counts this step
    -- at a flush: log steps, before a checkpoint, at the end --
    on_metrics(state, flush, control)       flush.rows moved to the host in one transfer;
                                            detectors add flush.events, sinks write both
    on_close(state, summary)                once, at the end; summary is summary.json's content

Data and control flow one way. The loop calls callbacks in list order (the default list puts
monitors and the spike watch before the sinks, so a sink sees a flush's events with the rows
they came from); a callback never calls another callback or the loop. It asks the loop to act
through :class:`Control` (stop, roll back, skip this step's update, end for preemption), and the
loop acts once per step, after the hooks have run. Decisions that must take effect in the same
step (skip) are device tensors made in ``before_optimizer_step``, without a host sync; decisions
that need host numbers are made in ``on_metrics``.

A callback's ``state_dict``/``load_state_dict`` is saved in every checkpoint, so a detector's
history survives a resume. A rollback restores it too, unless the callback keeps records of
what happened in wall-clock time (``restore_on_rollback = False``: fault injection, W&B).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from stability.model.loss import LossOutput


@dataclass
class StepState:
    """What a callback sees of the run. The loop keeps it current; callbacks only read it
    (``record`` hands the loop a statistic of the current step)."""

    run_dir: Path
    """The run directory."""
    device: torch.device
    """This rank's device."""
    model: torch.nn.Module
    """This rank's model (its pipeline stages as one module); hooks may be registered on it."""
    params: list[torch.nn.Parameter]
    """The model's trainable parameters, in ``model.parameters()`` order."""
    optimizer: Any
    """The optimizer's ``param_groups`` (the LR of this step) and ``state`` (Adam moments)."""
    grads: Callable[[], list[torch.Tensor | None] | None]
    """The reduced gradients aligned with ``params`` (None where they are sharded)."""
    record: Callable[[str, torch.Tensor], None]
    """``record(key, tensor)``: a statistic of the current step, a device tensor that moves to
    the host at the next flush (``metrics.jsonl`` key ``key``)."""
    vocab_size: int = 0
    """The tokenizer's vocabulary size (before padding)."""
    step: int = 0
    """Completed optimizer steps."""
    rollbacks: int = 0
    """Rollbacks so far in this run (not undone by a rollback)."""
    loss: torch.Tensor | None = None
    """This step's loss (mean over micro batches and data-parallel ranks), from
    ``before_optimizer_step`` on."""
    grad_norm: torch.Tensor | None = None
    """This step's global gradient norm before clipping, from ``before_optimizer_step`` on."""


@dataclass
class Flush:
    """Metric rows moved to the host together, and the detector events found in them."""

    rows: list[dict[str, Any]]
    """One ``metrics.jsonl`` row per step since the last flush, in step order."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """``events.jsonl`` rows (``action`` filled in) of these steps, in step order."""

    def events_at(self, step: int) -> list[dict[str, Any]]:
        return [event for event in self.events if event["step"] == step]


class Control:
    """Requests from callbacks to the loop; the loop reads and clears them once per step."""

    def __init__(self) -> None:
        self.skip: torch.Tensor | None = None
        self.stop_reason: str | None = None
        self.rollback_to: tuple[int, int, str] | None = None
        self.preempted = False

    def skip_update(self, decision: torch.Tensor) -> None:
        """Leave parameters and optimizer state untouched in this step where ``decision`` (a
        0-dim bool device tensor) is true; several requests combine with ``or``."""
        self.skip = decision if self.skip is None else self.skip | decision

    def stop(self, reason: str) -> None:
        """End the run after this step: checkpoint, status ``stopped``."""
        self.stop_reason = self.stop_reason or reason

    def rollback(self, max_step: int, skip_batches: int, reason: str) -> None:
        """Go back to the latest checkpoint at or before ``max_step`` and skip the next
        ``skip_batches`` global batches (the earliest request wins)."""
        if self.rollback_to is None or max_step < self.rollback_to[0]:
            self.rollback_to = (max_step, skip_batches, reason)

    def preempt(self) -> None:
        """The job is about to lose its allocation: checkpoint, status ``preempted``."""
        self.preempted = True

    def take_skip(self) -> torch.Tensor | None:
        skip, self.skip = self.skip, None
        return skip


class Callback:
    """Base class: every hook is optional. See the module docstring for when each is called."""

    name: str = "callback"
    """Key of this callback's state in checkpoints."""
    restore_on_rollback: bool = True
    """Does a rollback restore this callback's state from the checkpoint? False for records
    of what happened in wall-clock time, which a rollback must not undo."""

    def on_train_start(self, state: StepState) -> None:
        """Model, optimizer and data exist; no checkpoint has been loaded yet."""

    def on_restore(self, state: StepState, reason: str) -> None:
        """``state.step`` is where the run continues from (reason "resume" or "rollback")."""

    def on_step_start(self, state: StepState) -> None:
        """Before the forward passes of step ``state.step + 1``."""

    def on_batch(self, state: StepState, batch: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        """A micro batch of step ``state.step + 1`` before the model sees it; return it (or a
        replacement)."""
        return batch

    def on_loss(self, state: StepState, out: LossOutput) -> LossOutput:
        """A micro batch's loss and statistics before backward; return them (or
        replacements)."""
        return out

    def before_optimizer_step(self, state: StepState, control: Control) -> None:
        """Gradients are reduced over data parallel and clipped; the optimizer has not run."""

    def on_step_end(self, state: StepState) -> None:
        """The optimizer stepped; ``state.step`` counts completed steps."""

    def on_metrics(self, state: StepState, flush: Flush, control: Control) -> None:
        """Rows (host floats) since the last flush, and the events found in them so far."""

    def on_close(self, state: StepState, summary: dict[str, Any]) -> None:
        """The run ends; ``summary`` is what summary.json will hold (``status`` included)."""

    def summary(self) -> dict[str, Any]:
        """Entries this callback adds to summary.json."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint: tensors, numbers, strings, lists and dicts of them."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``'s output."""
