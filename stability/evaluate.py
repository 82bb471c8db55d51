"""Held-out evaluation: the next-token cross-entropy on the held-out split, forward only.

``eval_loss`` is what the figures compare (a training loss mixes learning with the LR still
being high; the held-out loss of an annealed run does not). It is the mean cross-entropy in
nats per token over the held-out split's sequences (no z-loss), the same held-out documents for
every seed (``data.split`` assigns documents by their stored order), averaged over
data-parallel ranks, computed on the last pipeline stage and sent to the others.
``trainer.eval_interval``: 0 evaluates at the end of the run, N also every N steps, null never;
``trainer.eval_batches`` caps the global batches per evaluation (null: all whole global batches
of the split, so that every parallel layout evaluates the same sequences).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from stability.model.loss import language_model_loss
from stability.parallel import Topology


class Evaluator:
    """Computes ``eval_loss`` when due; a device tensor, equal on every rank (no host sync).

    Args:
        batches: This rank's held-out micro batches (CPU tensors), read once.
        schedule: megatron's forward-backward function (forward only here).
        model: What the schedule runs (the engine's wrapped model or its chunks).
        chunks: The rank's model chunks (switched to eval mode while evaluating).
        mask: The causal attention mask.
        topology: The rank's place in the parallel grid.
        interval: ``trainer.eval_interval``; train_steps: the run's length.
    """

    def __init__(self, batches: list[dict[str, torch.Tensor]], schedule: Any, model: Any,
                 chunks: list[torch.nn.Module], mask: torch.Tensor, topology: Topology,
                 interval: int | None, train_steps: int) -> None:
        # The interleaved schedule runs micro batches in groups of the pipeline size.
        usable = len(batches) - len(batches) % topology.pp_size if len(chunks) > 1 else \
            len(batches)
        self.batches = batches[:usable]
        self.schedule = schedule
        self.model = model
        self.chunks = chunks
        self.mask = mask
        self.topology = topology
        self.interval = interval
        self.train_steps = train_steps
        self.last: torch.Tensor | None = None
        """The latest evaluation (a device tensor until read)."""

    @classmethod
    def of(cls, t: Any, data: Any, schedule: Any, model: Any, chunks: list[torch.nn.Module],
           mask: torch.Tensor, topology: Topology) -> Evaluator:
        """The evaluator of a run: ``t`` is its ``trainer`` config section, ``data`` its
        ``stability.data.TrainData`` (the held-out micro batches are read here, once)."""
        batches = []
        if t.eval_interval is not None and data.valid is not None:
            whole = len(data.valid) // t.global_batch_size
            count = whole if t.eval_batches is None else min(whole, t.eval_batches)
            batches = list(data.eval_batches(t.micro_batch_size, count * t.global_batch_size))
        return cls(batches, schedule, model, chunks, mask, topology, t.eval_interval,
                   t.train_steps)

    def due(self, step: int) -> bool:
        if self.interval is None or not self.batches:
            return False
        return step >= self.train_steps or (self.interval > 0 and step % self.interval == 0)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        device, losses = self.topology.device, []
        batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()}
                   for b in self.batches]
        iterators = [iter(batches) for _ in self.chunks]
        for chunk in self.chunks:
            chunk.eval()
        try:
            self.schedule(forward_step_func=functools.partial(self._forward, losses),
                          data_iterator=iterators if len(self.chunks) > 1 else iterators[0],
                          model=self.model, num_microbatches=len(batches),
                          seq_length=self.mask.shape[-1],
                          micro_batch_size=batches[0]["tokens"].shape[0], forward_only=True)
        finally:
            for chunk in self.chunks:
                chunk.train()
        loss = (torch.stack(losses).mean() if losses
                else torch.zeros((), device=device)).float()
        if self.topology.pp_size > 1:
            dist.broadcast(loss, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        if self.topology.dp_size > 1:
            dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            loss = loss / self.topology.dp_size
        self.last = loss
        return loss

    def last_loss(self) -> float:
        """The latest ``eval_loss`` (NaN before any); reads the device."""
        return float("nan") if self.last is None else float(self.last)

    def state_dict(self) -> dict[str, float]:
        return {"last": self.last_loss()}

    def load_state_dict(self, state: dict[str, float]) -> None:
        last = state["last"]
        self.last = None if last != last else torch.tensor(last)  # NaN: none yet

    def _forward(self, losses: list[torch.Tensor], data_iterator, model: torch.nn.Module):
        batch = next(data_iterator)
        with self.chunks[-1].hidden_output():
            output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                           attention_mask=self.mask)

        def loss(output: torch.Tensor):
            out = language_model_loss(self.chunks[-1], output, batch["labels"],
                                      batch["loss_mask"], 0.0)
            # A copy: megatron's schedule divides the returned loss in place, and without
            # z-loss cross_entropy shares its storage.
            losses.append(out.cross_entropy.clone())
            return out.loss, {}

        return output, loss
