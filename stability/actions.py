"""Acting on detector events: log, alert, skip the step, roll back, stop.

``SpikeWatch`` runs the detectors on every metrics row (the same code ``python -m
stability.detect`` runs offline), writes ``events.jsonl``, tells the other callbacks (W&B
alerts) and asks the trainer to roll back or stop. A step is skipped on the device, in the same
step, by ``SkipGuard``: host-side detectors see a step only after it happened.

Policies (``actions.on_spike`` for loss/grad-norm spikes, ``actions.on_nonfinite``,
``actions.on_leading``): ``log`` writes the event; ``alert`` also alerts (W&B); ``skip_step``
leaves parameters and optimizer state untouched in the steps the guard flags; ``rollback`` loads
the latest checkpoint at least ``rollback_margin_steps`` before the event and skips the next
``rollback_skip_batches`` batches (PaLM's remedy), at most ``max_rollbacks`` times, then stops;
``stop`` checkpoints and ends the run with status ``stopped``. A non-finite update is never
applied when on_nonfinite is skip_step, rollback or stop, so a stopping checkpoint is clean.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from stability.callbacks import Callback
from stability.config import ActionsConfig, DetectorsConfig
from stability.detectors import DetectorSuite, Event
from stability.sinks.jsonl import truncate_jsonl

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

    def decide(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
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
        slot = self.count % self.window
        self.history[:, slot] = torch.where(finite, values, self.history[:, slot])
        self.count += finite.long()
        return skip

    def state_dict(self) -> dict:
        return {"history": self.history, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"].to(self.history.device)
        self.count = state["count"].to(self.count.device)


class SpikeWatch(Callback):
    """Detectors in the loop, and the policy that acts on their events."""

    name = "spike_watch"

    def __init__(self, detectors: DetectorsConfig, actions: ActionsConfig, run_dir: Path,
                 is_main: bool, device: torch.device) -> None:
        self.suite = DetectorSuite.from_names(detectors.names, detectors.params)
        self.cfg = actions
        self.path = run_dir / "events.jsonl"
        self.is_main = is_main
        skip_spikes = actions.on_spike == "skip_step"
        skip_nonfinite = actions.on_nonfinite in ("skip_step", "rollback", "stop")
        self.guard = (SkipGuard(actions.skip_window, actions.skip_zscore, skip_spikes, device)
                      if skip_spikes or skip_nonfinite else None)

    @property
    def needs_skippable_optimizer(self) -> bool:
        return self.guard is not None

    def on_restore(self, trainer, reason: str) -> None:
        if self.is_main and reason == "resume":  # a rollback keeps the record of why it happened
            truncate_jsonl(self.path, trainer.step)

    def before_optimizer_step(self, trainer) -> None:
        if self.guard is None:
            return
        skip = self.guard.decide(trainer.step_loss, trainer.step_grad_norm)
        trainer.optimizer.skip = skip
        trainer.record("skipped", skip.float())

    def on_metrics(self, trainer, rows) -> None:
        events = [self._decide(trainer, event, row)
                  for row in rows for event in self.suite.update(row["step"], row)]
        if not events:
            return
        if self.is_main:
            with self.path.open("a") as f:
                for event in events:
                    f.write(json.dumps(event.to_json()) + "\n")
                    print(f"[{event.severity}] step {event.step} {event.detector}: "
                          f"{event.metric}={event.value:.4g} (threshold {event.threshold:.4g})"
                          f" -> {event.action}", file=sys.stderr, flush=True)
        trainer.emit_events([e.to_json() for e in events])
        strongest = max(events, key=lambda e: _STRENGTH[e.action])
        if strongest.action == "stop":
            trainer.request_stop(f"{strongest.detector} at step {strongest.step}")
        elif strongest.action == "rollback":
            trainer.request_rollback(strongest.step - self.cfg.rollback_margin_steps,
                                     self.cfg.rollback_skip_batches)

    def _decide(self, trainer, event: Event, row: dict) -> Event:
        policy = {"nonfinite": self.cfg.on_nonfinite, "spike": self.cfg.on_spike,
                  "leading": self.cfg.on_leading}[event.kind]
        if policy == "skip_step":
            policy = "skip_step" if row.get("skipped") else "alert"
        if policy == "rollback" and trainer.rollbacks >= self.cfg.max_rollbacks:
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
