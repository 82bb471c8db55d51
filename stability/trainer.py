"""The training loop: one optimizer step at a time, then one point where the loop acts.

A step is forward/backward over the micro batches (megatron-core's pipeline schedule: 1F1B
across stages, plain accumulation without pipeline parallelism), a global grad norm and clip,
an optimizer step (``stability/engine.py``: torch on CPU, megatron-core's DDP and optimizer on
GPU). After each step comes the one point where the loop acts (``finish_step``): flush the
metrics buffer when due and hand the rows to the callbacks, then do what they asked through
the :class:`~stability.callbacks.Control` (stop, roll back, end for preemption), then save a
checkpoint when due. Everything else (statistics, detectors, files, console, W&B, fault
injection) is a callback (``stability/callbacks.py``).
"""

from __future__ import annotations

import functools
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from stability import cpu, parallel
from stability.callbacks import Callback, Control, Flush, StepState
from stability.checkpoint import Candidate, Checkpointer, rng_state, set_rng_state
from stability.config import Config, to_yaml
from stability.data import build_train_data
from stability.engine import build_engine
from stability.evaluate import Evaluator
from stability.metrics_buffer import MetricsBuffer
from stability.model.build import build_model, causal_mask, compile_model
from stability.model.chunks import ModelChunks
from stability.model.loss import language_model_loss
from stability.optim.adamw import build_scheduler
from stability.runfiles import RunFiles
from stability.runtime import Runtime
from stability.throughput import Throughput, model_flops_per_token, peak_flops

LOSS_STATS = ("loss", "z_loss", "logsumexp_mean", "logit_max_abs")
"""Per-step statistics of the loss, in this order (computed on the last pipeline stage)."""


class Trainer:
    """Owns the model, optimizer, data and callbacks of one run; ``fit()`` trains it."""

    def __init__(self, cfg: Config, run_dir: Path, callbacks: list[Callback], *,
                 runtime: Runtime, topology: parallel.Topology | None = None) -> None:
        self.cfg = cfg
        self.files = RunFiles(Path(run_dir))
        runtime.apply()
        p, t = cfg.parallel, cfg.trainer
        self.topology = topology or parallel.init(runtime.device, p.tensor, p.pipeline,
                                                  p.virtual_pipeline)
        self.device = self.topology.device
        self.runtime = runtime
        seed_everything(t.seed, self.topology.tp_rank, runtime.device_type)

        dp = self.topology.dp_size
        self.accumulation = t.global_batch_size // (t.micro_batch_size * dp)
        self.data = build_data(cfg, self.topology)
        vocab_size = self.data.tokenizer.vocab_size
        self.chunks = build_chunks(cfg, runtime, vocab_size, self.device)
        self.model = self.chunks[0] if len(self.chunks) == 1 else ModelChunks(self.chunks)
        params = [param for param in self.model.parameters() if param.requires_grad]
        self.engine = build_engine(self.model, self.chunks, params, cfg.optim, self.topology,
                                   runtime)
        self.scheduler = build_scheduler(self.engine.optimizer, cfg.optim, t.train_steps)
        self.forward_backward = get_forward_backward_func()
        self.chunks[0].config.no_sync_func = self.engine.no_sync_func
        self.mask = causal_mask(cfg.data.seq_length, self.device)
        self.parameters = parallel.count_parameters(params, self.topology)
        self.evaluator = Evaluator.of(t, self.data, self.forward_backward, self.engine.wrapped,
                                      self.chunks, self.mask, self.topology)

        self.throughput = Throughput(
            model_flops_per_token(cfg.model, vocab_size, cfg.data.seq_length),
            peak_flops(self.device)[0], self.topology.launch.world_size)
        self.buffer = MetricsBuffer(self.throughput, parallel_state.get_data_parallel_group()
                                    if dp > 1 else None, dp)
        self.checkpointer = Checkpointer.of(self.files.checkpoints, cfg.checkpoint.keep_last,
                                            self.topology)
        self.callbacks = list(callbacks)
        self.control = Control()
        self.state = StepState(run_dir=self.files.root, device=self.device, model=self.model,
                               params=params, optimizer=self.engine.optimizer,
                               grads=self.engine.grads, record=self.buffer.record,
                               vocab_size=vocab_size)
        self.tokens = 0
        self.elapsed = 0.0  # training seconds, carried over resumes
        self.last_row: dict[str, Any] = {}
        self.stop_reason: str | None = None
        self.started = False

    # ------------------------------------------------------------------ the loop
    def start(self, resume: bool = True) -> Candidate | None:
        """``on_train_start``, then the newest intact checkpoint (when ``resume``), then
        ``on_restore``; the checkpoint resumed from, or None."""
        self.started = True
        self._call("on_train_start")
        loaded = self._load(None, "resume") if resume else None
        self._call("on_restore", "resume")
        return loaded

    def fit(self) -> dict[str, Any]:
        """Train to ``trainer.train_steps`` or until a callback ends the run; the summary."""
        if not self.started:
            self.start(self.cfg.checkpoint.resume == "auto")
        status = "completed"
        try:
            while self.state.step < self.cfg.trainer.train_steps:
                self.train_step()
                ended = self.finish_step()
                if ended:
                    status = ended
                    break
        except BaseException:
            status = "crashed"
            raise
        finally:
            if status != "crashed" or self.topology.dp_size == 1:  # no collective after a crash
                self._flush()
            summary = self.summary(status)
            self._call("on_close", summary)
        return summary

    def train_step(self) -> None:
        """One optimizer step over the global batch."""
        start = time.perf_counter()
        state, cfg = self.state, self.cfg
        self.throughput.step_started()
        self.scheduler.step(1)
        self._call("on_step_start")
        self.engine.zero_grad()
        self._micro_stats: list[torch.Tensor] = []
        # This step's micro batches, the same on every stage: each model chunk walks them in
        # order (the interleaved schedule visits chunks out of order).
        batches = [self._next_micro_batch() for _ in range(self.accumulation)]
        iterators = [iter(batches) for _ in self.chunks]
        self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(self.chunks) > 1 else iterators[0],
            model=self.engine.wrapped, num_microbatches=self.accumulation,
            seq_length=cfg.data.seq_length, micro_batch_size=cfg.trainer.micro_batch_size)
        self.engine.finish_grads()
        stats = loss_statistics(self._micro_stats, self.topology)
        state.loss = stats["loss"] = data_parallel_mean(stats["loss"], self.topology)
        state.grad_norm = stats["grad_norm"] = self.engine.grad_norm()
        self.engine.clip(state.grad_norm, cfg.optim.clip_grad)
        self._call("before_optimizer_step", self.control)
        self.engine.step(self.control.take_skip())
        state.step += 1
        tokens = cfg.trainer.global_batch_size * cfg.data.seq_length
        self.tokens += tokens
        self.throughput.add(tokens)
        for key, value in stats.items():
            self.buffer.record(key, value)
        self._call("on_step_end")
        step_time = time.perf_counter() - start
        self.elapsed += step_time
        if self.evaluator.due(state.step):
            self.buffer.record("eval_loss", self.evaluator())
        self.buffer.end_step({"step": state.step, "lr": self.engine.optimizer.param_groups[0]["lr"],
                              "tokens": self.tokens, "time": self.elapsed,
                              "step_time": step_time})

    def finish_step(self) -> str | None:
        """The one point per step where the loop acts; the run's end status, or None."""
        step, cfg = self.state.step, self.cfg
        last = step >= cfg.trainer.train_steps
        save_due = (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or (
            last and cfg.checkpoint.save_final)
        if step % self.runtime.log_interval == 0 or save_due or last:
            self._flush()
        control, self.control = self.control, Control()
        if control.rollback_to is not None and control.stop_reason is None:
            max_step, skip_batches, reason = control.rollback_to
            if not self._roll_back(max_step, skip_batches):
                control.stop(f"{reason}: no checkpoint at or before step {max_step} to roll "
                             f"back to")
            save_due = False  # the state is the checkpoint's
        if control.stop_reason or control.preempted:
            self.stop_reason = control.stop_reason
            self._save()
            return "stopped" if control.stop_reason else "preempted"
        if save_due:
            self._save()
        return None

    def _flush(self) -> None:
        rows = self.buffer.flush()
        if rows:
            self.last_row = rows[-1]
            self._call("on_metrics", Flush(rows), self.control)

    def _roll_back(self, max_step: int, skip_batches: int) -> bool:
        """Back to the latest checkpoint at or before ``max_step``; False when there is none."""
        if self._load(max_step, "rollback") is None:
            return False
        self.state.rollbacks = self.checkpointer.rollbacks = self.checkpointer.rollbacks + 1
        self.checkpointer.discard_after(self.state.step)
        self.data.loader.skip_global_batches(skip_batches)
        self._call("on_restore", "rollback")
        return True

    def _next_micro_batch(self) -> dict[str, torch.Tensor]:
        batch = self.data.loader.next_micro_batch()
        for callback in self.callbacks:
            batch = callback.on_batch(self.state, batch)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _forward_step(self, data_iterator, model: torch.nn.Module):
        """megatron's forward_step_func: one micro batch through one model chunk (every stage
        reads the same micro batches; a later stage's input comes from its neighbour)."""
        batch = next(data_iterator)
        with self.chunks[-1].hidden_output():  # the loss may apply the output layer
            return (model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                          attention_mask=self.mask), functools.partial(self._loss, batch))

    def _loss(self, batch: dict[str, torch.Tensor], output: torch.Tensor):
        """Last stage: the loss of a micro batch's logits or final hidden states."""
        out = language_model_loss(self.chunks[-1], output, batch["labels"], batch["loss_mask"],
                                  self.cfg.loss.z_loss)
        for callback in self.callbacks:
            out = callback.on_loss(self.state, out)
        self._micro_stats.append(torch.stack([
            out.cross_entropy, out.z_loss, out.logsumexp_mean, out.logit_max_abs]).float())
        return (out.loss if self.cfg.loss.scale == 1 else out.loss * self.cfg.loss.scale), {}

    def _call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self.state, *args)

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> None:
        if self.checkpointer.last_saved != self.state.step:
            self.checkpointer.save(self.state_dict(), self.state.step, to_yaml(self.cfg))

    def _load(self, max_step: int | None, reason: str) -> Candidate | None:
        loaded = self.checkpointer.load(max_step)
        if loaded is None:
            return None
        self.load_state_dict(loaded[1], reason)
        return loaded[0]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this rank's run exactly (weights-only types)."""
        return {
            "step": self.state.step, "tokens": self.tokens, "elapsed": self.elapsed,
            "rollbacks": self.checkpointer.rollbacks, "last_row": self.last_row,
            "evaluator": self.evaluator.state_dict(),
            "model": self.model.state_dict(), "optimizer": self.engine.state_dict(),
            "scheduler_steps": self.scheduler.num_steps, "data": self.data.loader.state_dict(),
            "rng": rng_state(self.runtime.device_type),
            "callbacks": {c.name: c.state_dict() for c in self.callbacks},
        }

    def load_state_dict(self, state: dict[str, Any], reason: str = "resume") -> None:
        """Continue from ``state``. The schedule follows this run's config from the saved
        step; a rollback keeps the rollback count and the wall-clock records of callbacks."""
        self.state.step, self.tokens, self.elapsed = state["step"], state["tokens"], \
            state["elapsed"]
        self.last_row = state["last_row"]
        self.evaluator.load_state_dict(state["evaluator"])
        if reason == "resume":
            self.checkpointer.rollbacks = self.state.rollbacks = state["rollbacks"]
        self.model.load_state_dict(state["model"])
        self.engine.load_state_dict(state["optimizer"])
        self.scheduler.num_steps = state["scheduler_steps"]
        self.data.loader.load_state_dict(state["data"])
        set_rng_state(state["rng"], self.runtime.device_type)
        for callback in self.callbacks:
            if callback.name in state["callbacks"] and (reason == "resume"
                                                        or callback.restore_on_rollback):
                callback.load_state_dict(state["callbacks"][callback.name])

    # ------------------------------------------------------------------ the end
    def summary(self, status: str) -> dict[str, Any]:
        """summary.json's content for a run that ends with ``status``."""
        loss = self.last_row.get("loss", float("nan"))
        if status == "completed" and not math.isfinite(loss):
            status = "diverged"
        summary = {"status": status, "steps": self.state.step, "final_loss": loss,
                   "eval_loss": self.evaluator.last_loss(),
                   "tokens": self.tokens, "parameters": self.parameters,
                   "rollbacks": self.checkpointer.rollbacks, **self.throughput.summary()}
        if self.runtime.is_cuda:
            summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.stop_reason:
            summary["stop_reason"] = self.stop_reason
        for callback in self.callbacks:
            summary.update(callback.summary())
        return summary


def build_data(cfg: Config, topology: parallel.Topology):
    """The run's tokenizer, datasets and this rank's loader (stability.data)."""
    t = cfg.trainer
    return build_train_data(
        cfg.data, seed=t.seed, global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size, dp_rank=topology.dp_rank, dp_size=topology.dp_size,
        train_samples=t.train_steps * t.global_batch_size,
        default_tokenizer=cfg.model.init_from_dir)


def seed_everything(seed: int, tp_rank: int, device_type: str) -> None:
    """Python's, numpy's and torch's generators, and megatron's tensor-parallel streams."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    cpu.seed_model_parallel_rng(seed, tp_rank, device_type)


def build_chunks(cfg: Config, runtime: Runtime, vocab_size: int,
                 device: torch.device) -> list[torch.nn.Module]:
    """This rank's model: one chunk per virtual pipeline stage (one without virtual stages),
    with its shard of ``model.init_from``'s weights when set (loaded here, before the optimizer
    copies the weights; a resume then loads the run's checkpoint over them), compiled in place
    when ``trainer.compile``."""
    p = cfg.parallel
    stages = [None] if p.virtual_pipeline is None else list(range(p.virtual_pipeline))
    chunks = [build_model(cfg.model, runtime, vocab_size=vocab_size,
                          seq_length=cfg.data.seq_length, seed=cfg.trainer.seed,
                          tensor=p.tensor, pipeline=p.pipeline,
                          virtual_pipeline=p.virtual_pipeline, vp_stage=stage,
                          output_in_loss=runtime.output_in_loss).to(device)
              for stage in stages]
    if cfg.model.init_from:
        from stability.hf.load import load_hf_weights

        load_hf_weights(chunks, cfg.model, tp_size=p.tensor,
                        tp_rank=parallel_state.get_tensor_model_parallel_rank())
    if cfg.trainer.compile:
        for chunk in chunks:
            compile_model(chunk)
    return chunks


def loss_statistics(micro_stats: list[torch.Tensor],
                    topology: parallel.Topology) -> dict[str, torch.Tensor]:
    """A step's loss statistics on every rank: means over micro batches (the maximum for
    logit_max_abs), sent from the last pipeline stage (which computed them) to the others."""
    if micro_stats:
        micro = torch.stack(micro_stats)
        stats = torch.cat([micro[:, :3].mean(dim=0), micro[:, 3].amax().reshape(1)])
    else:
        stats = torch.zeros(len(LOSS_STATS), device=topology.device)
    if topology.pp_size > 1:
        dist.broadcast(stats, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return dict(zip(LOSS_STATS, stats.unbind(), strict=True))


def data_parallel_mean(value: torch.Tensor, topology: parallel.Topology) -> torch.Tensor:
    if topology.dp_size > 1:
        value = value.clone()
        dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value /= topology.dp_size
    return value
