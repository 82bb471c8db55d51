"""Acting on detector events: log, alert, skip the step, roll back, stop.

``SpikeWatch`` runs the detectors on every metrics row (the same code ``python -m
stability.detect`` runs offline), decides an action for each event, adds the events to the
flush (the events sink writes ``events.jsonl`` and the console lines, W&B alerts) and asks the
loop, through its control object, to roll back or stop. A step is skipped on the device, in the
same step, by ``SkipGuard``: host-side detectors see a step only after it happened.

Policies (``actions.on_spike`` for loss/grad-norm spikes, ``actions.on_nonfinite``,
``actions.on_leading``): ``log`` writes the event; ``alert`` also alerts (W&B); ``skip_step``
leaves parameters and optimizer state untouched in the steps the guard flags; ``rollback`` loads
the latest checkpoint at least ``rollback_margin_steps`` before the event and skips the next
``rollback_skip_batches`` batches (PaLM's remedy), at most ``max_rollbacks`` times, then stops;
``stop`` checkpoints and ends the run with status ``stopped``. A non-finite update is never
applied when on_nonfinite is skip_step, rollback or stop, so a stopping checkpoint is clean.
"""

from __future__ import annotations

import torch

from stability.callbacks import Callback, Control, Flush, StepState
from stability.detectors import DetectorSuite, Event
from stability.watch.config import ActionsConfig, DetectorsConfig

_STRENGTH = {"log": 0, "alert": 1, "skip_step": 2, "rollback": 3, "stop": 4}


class SkipGuard:
    """Decides on the device whether this step's update is skipped.

    A step is skipped when the loss or the grad norm is not finite, or (``spikes``) when either
    exceeds mean + z * std of the last ``window`` steps (OLMo-core's rule; at least 10 steps of
    history). Finite values enter the history even when skipped, as in OLMo-core: a lasting
    level shift is absorbed within a few steps instead of skipping every step after it.
    """

    def __init__(self, window: int, zscore: float, spikes: bool, device: torch.device) -> None:
        self.window = window
        self.zscore = zscore
        self.spikes = spikes
        self.history = torch.full((2, window), float("nan"), device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.slots = torch.arange(window, device=device)

    def decide(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """True where this step's update must be skipped; no host sync (the ring buffer's slot
        is a mask, not an index)."""
        values = torch.stack([loss.float(), grad_norm.float()])
        skip = ~torch.isfinite(values).all()
        if self.spikes:
            valid = ~torch.isnan(self.history)
            n = valid.sum(dim=1)
            mean = torch.nansum(self.history, dim=1) / n.clamp(min=1)
            var = torch.nansum((self.history - mean[:, None]).square(), dim=1) / n.clamp(min=2)
            spike = (n >= 10) & (values > mean + self.zscore * var.sqrt())
            skip = skip | spike.any()
        finite = torch.isfinite(values).all()
        slot = (self.slots == self.count % self.window) & finite
        self.history = torch.where(slot, values[:, None], self.history)
        self.count += finite.long()
        return skip

    def state_dict(self) -> dict:
        return {"history": self.history, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """Restore; a history of another window length (``actions.skip_window`` changed on
        resume) keeps its newest values, in order."""
        history, count = state["history"].to(self.history.device), int(state["count"])
        saved = history.shape[1]
        if saved != self.window:
            kept = min(saved, self.window, count)
            order = [(count - kept + i) % saved for i in range(kept)]
            self.history = torch.full((2, self.window), float("nan"),
                                      device=self.history.device)
            self.history[:, :kept] = history[:, order]
            count = kept
        else:
            self.history = history
        self.count = torch.tensor(count, dtype=torch.long, device=self.count.device)


class SpikeWatch(Callback):
    """Detectors in the loop, and the policy that acts on their events."""

    name = "spike_watch"

    def __init__(self, detectors: DetectorsConfig, actions: ActionsConfig) -> None:
        self.suite = DetectorSuite.from_names(detectors.names, detectors.params)
        self.cfg = actions
        self.guard: SkipGuard | None = None

    def on_train_start(self, state: StepState) -> None:
        a = self.cfg
        skip_spikes = a.on_spike == "skip_step"
        if skip_spikes or a.on_nonfinite in ("skip_step", "rollback", "stop"):
            self.guard = SkipGuard(a.skip_window, a.skip_zscore, skip_spikes, state.device)

    def before_optimizer_step(self, state: StepState, control: Control) -> None:
        if self.guard is None:
            return
        skip = self.guard.decide(state.loss, state.grad_norm)
        control.skip_update(skip)
        state.record("skipped", skip.float())

    def on_metrics(self, state: StepState, flush: Flush, control: Control) -> None:
        events = [self._decide(state, event, row)
                  for row in flush.rows for event in self.suite.update(row["step"], row)]
        if not events:
            return
        flush.events.extend(event.to_json() for event in events)
        strongest = max(events, key=lambda e: _STRENGTH[e.action])
        reason = f"{strongest.detector} at step {strongest.step}"
        if strongest.action == "stop":
            control.stop(reason)
        elif strongest.action == "rollback":
            control.rollback(strongest.step - self.cfg.rollback_margin_steps,
                             self.cfg.rollback_skip_batches, reason)

    def _decide(self, state: StepState, event: Event, row: dict) -> Event:
        policy = {"nonfinite": self.cfg.on_nonfinite, "spike": self.cfg.on_spike,
                  "leading": self.cfg.on_leading}[event.kind]
        if policy == "skip_step":
            policy = "skip_step" if row.get("skipped") else "alert"
        if policy == "rollback" and state.rollbacks >= self.cfg.max_rollbacks:
            policy = "stop"
        return event.with_action(policy)

    def state_dict(self) -> dict:
        state = {"suite": self.suite.state_dict()}
        if self.guard is not None:
            state["guard"] = self.guard.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.suite.load_state_dict(state["suite"])
        if self.guard is not None and "guard" in state:
            self.guard.load_state_dict(state["guard"])
