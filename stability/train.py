"""Train a megatron-core GPT model from a Hydra config: ``python -m stability.train [overrides]``.

The loop is short on purpose: a step is forward/backward over the micro batches (megatron-core's
pipeline schedule: 1F1B across stages, plain accumulation without pipeline parallelism), a global
grad norm and clip, an optimizer step; everything else (metric files, console, checkpoints, W&B,
detectors) is a callback. How gradients are reduced and applied (torch on CPU, megatron-core's
DDP and optimizer on GPU) is the engine's business (stability/engine.py).
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared
from omegaconf import DictConfig, OmegaConf

import stability  # noqa: F401  (quiets megatron-core's import warnings)
from stability import cpu, parallel
from stability.actions import SpikeWatch
from stability.callbacks import Callback
from stability.checkpoint import Checkpointer, load_latest, rng_state, set_rng_state
from stability.config import Config, register_configs, resolve_precision, validate
from stability.data import build_train_data
from stability.engine import build_engine
from stability.errors import ConfigError
from stability.fault import FaultInjector
from stability.loss import vocab_parallel_loss
from stability.model import build_model, causal_mask
from stability.model.chunks import ModelChunks
from stability.monitors import Monitors
from stability.optim import build_scheduler
from stability.preemption import Preemption
from stability.sinks.console import ConsoleProgress
from stability.sinks.jsonl import JsonlWriter
from stability.throughput import Throughput, model_flops_per_token, peak_flops

# Per-step statistics of the loss, in this order (computed on the last pipeline stage).
_LOSS_STATS = ("loss", "z_loss", "logsumexp_mean", "logit_max_abs")


class Trainer:
    """Owns the model, optimizer, data and callbacks of one run; ``fit()`` trains it."""

    def __init__(self, cfg: Config, run_dir: Path, callbacks: list[Callback] | None = None,
                 topology: parallel.Topology | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        cpu.apply()
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        self.topology = topology or parallel.init(
            parallel.resolve_device(cfg.trainer.device), cfg.parallel.tensor,
            cfg.parallel.pipeline, cfg.parallel.virtual_pipeline)
        self.device = self.topology.device
        self._seed(cfg.trainer.seed)

        t = cfg.trainer
        self.accumulation = t.global_batch_size // (t.micro_batch_size * self.topology.dp_size)
        self.data = build_train_data(
            cfg.data, seed=t.seed, global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size, dp_rank=self.topology.dp_rank,
            dp_size=self.topology.dp_size, train_samples=t.train_steps * t.global_batch_size)
        bf16 = resolve_precision(t.precision, self.device) == "bf16"
        vocab_size = self.data.tokenizer.vocab_size
        # One chunk per virtual pipeline stage (one without virtual stages).
        stages = [None] if cfg.parallel.virtual_pipeline is None else \
            list(range(cfg.parallel.virtual_pipeline))
        self.chunks = [build_model(cfg, vocab_size, bf16=bf16, vp_stage=stage,
                                   params_dtype=torch.bfloat16 if bf16 else torch.float32,
                                   ).to(self.device) for stage in stages]
        self.model = self.chunks[0] if len(self.chunks) == 1 else ModelChunks(self.chunks)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.callbacks: list[Callback] = list(callbacks or [])
        skippable = any(getattr(c, "needs_skippable_optimizer", False) for c in self.callbacks)
        self.engine = build_engine(self.model, self.chunks, cfg, self.topology, skippable)
        self.optimizer = self.engine.optimizer
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.forward_backward = get_forward_backward_func()
        self.chunks[0].config.no_sync_func = self.engine.no_sync_func
        self.throughput = Throughput(model_flops_per_token(cfg, vocab_size),
                                     peak_flops(self.device)[0], self.topology.launch.world_size)
        self.mask = causal_mask(cfg.data.seq_length, self.device)
        self.fault = FaultInjector(cfg.fault)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.interval,
                                         cfg.checkpoint.keep_last, cfg.checkpoint.save_final)
        self.callbacks.append(self.checkpointer)

        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0  # training seconds, carried over resumes
        self.rollbacks = 0
        self.status = "running"
        self.stop_reason: str | None = None
        self.step_tensors: dict[str, torch.Tensor] = {}
        self._pending: list[dict[str, Any]] = []
        self._rollback: tuple[int, int] | None = None
        self.preemption: Preemption | None = None

    # ------------------------------------------------------------------ set-up helpers
    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        cpu.seed_model_parallel_rng(seed, self.topology.tp_rank)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to ``trainer.train_steps`` (or until a callback stops the run)."""
        self._call("on_train_start")
        if self.cfg.checkpoint.resume == "auto":
            load_latest(self, self.run_dir / "checkpoints")
        self.checkpointer.last_saved = self.step or None
        self._call("on_restore", "resume")
        try:
            while self.step < self.cfg.trainer.train_steps and self.stop_reason is None:
                self.train_step()
                if self._rollback is not None:
                    self._roll_back(*self._rollback)
                if self._preempted():
                    self.status = "preempted"
                    self.checkpointer.save(self)
                    return self.summary()
            self.status = "stopped" if self.stop_reason else "completed"
        except BaseException:
            self.status = "crashed"
            raise
        finally:
            self.flush_metrics()
            self._call("on_close", self.status)
        return self.summary()

    def train_step(self) -> None:
        """One optimizer step over the global batch."""
        start = time.perf_counter()
        self.throughput.step_started()
        self.step_tensors = {}
        self.scheduler.step(1)
        self.fault.step_started(self.step + 1, self.optimizer)
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
            seq_length=self.cfg.data.seq_length,
            micro_batch_size=self.cfg.trainer.micro_batch_size)
        self.engine.finish_grads()
        stats = self._loss_statistics()
        self.step_loss = self._data_parallel_mean(stats["loss"])
        self.step_grad_norm = self.engine.grad_norm()
        self.engine.clip(self.step_grad_norm, self.cfg.optim.clip_grad)
        self._call("before_optimizer_step")
        self.engine.step()
        self.step += 1
        self.fault.step_ended(self.step)
        tokens_step = self.cfg.trainer.global_batch_size * self.cfg.data.seq_length
        self.tokens += tokens_step
        self.throughput.add(tokens_step)
        step_time = time.perf_counter() - start
        self.elapsed += step_time
        self._record(stats, step_time)
        self._call("on_step_end")
        if self.step % self.cfg.trainer.log_interval == 0:
            self.flush_metrics()

    def _next_micro_batch(self) -> dict[str, torch.Tensor]:
        batch = self.data.loader.next_micro_batch()
        batch = self.fault.batch(self.step + 1, batch, self.data.tokenizer.vocab_size)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _forward_step(self, data_iterator, model: torch.nn.Module):
        """megatron's forward_step_func: one micro batch through one model chunk.

        Every stage reads the same micro batches (same data-parallel rank): the first stage
        reads the tokens, the last the labels; a later stage's input comes from its neighbour.
        """
        batch = next(data_iterator)
        output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                       attention_mask=self.mask)
        return output, functools.partial(self._loss, batch)

    def _loss(self, batch: dict[str, torch.Tensor], logits: torch.Tensor):
        """Last stage: the micro batch's loss (the schedule divides it by the micro batches)."""
        out = vocab_parallel_loss(logits, batch["labels"], batch["loss_mask"],
                                  self.cfg.loss.z_loss)
        self._micro_stats.append(torch.stack([
            self.fault.loss(self.step + 1, out.cross_entropy), out.z_loss, out.logsumexp_mean,
            out.logit_max_abs]).float())
        return self.fault.loss(self.step + 1, out.loss), {}

    def _loss_statistics(self) -> dict[str, torch.Tensor]:
        """This step's loss statistics on every rank: means over micro batches (the maximum for
        logit_max_abs), sent from the last pipeline stage to the others."""
        if self._micro_stats:
            micro = torch.stack(self._micro_stats)
            stats = torch.cat([micro[:, :3].mean(dim=0), micro[:, 3].amax().reshape(1)])
        else:
            stats = torch.zeros(len(_LOSS_STATS), device=self.device)
        if self.topology.pp_size > 1:
            dist.broadcast(stats, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return dict(zip(_LOSS_STATS, stats.unbind(), strict=True))

    # ------------------------------------------------------------------ actions
    def request_stop(self, reason: str) -> None:
        """End the run after this step, with a checkpoint and status ``stopped``."""
        self.stop_reason = reason

    def request_rollback(self, max_step: int, skip_batches: int) -> None:
        """After this step, go back to the latest checkpoint at or before ``max_step``."""
        self._rollback = (max_step, skip_batches)

    def _roll_back(self, max_step: int, skip_batches: int) -> None:
        self._rollback = None
        self.flush_metrics()
        rollbacks, fault_done = self.rollbacks, self.fault.done
        step = load_latest(self, self.run_dir / "checkpoints", max_step=max_step)
        if step is None:
            self.request_stop(f"no checkpoint at or before step {max_step} to roll back to")
            return
        self.rollbacks, self.fault.done = rollbacks + 1, fault_done
        self.data.loader.skip_global_batches(skip_batches)
        self.checkpointer.last_saved = self.step
        self._call("on_restore", "rollback")

    def _preempted(self) -> bool:
        """Did any rank get the warning signal? Agreed on at log steps (a sync point anyway)."""
        if self.preemption is None or self.step % self.cfg.trainer.log_interval:
            return False
        flag = torch.tensor([float(self.preemption.received is not None)], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def emit_events(self, events: list[dict[str, Any]]) -> None:
        """Hand detector events (events.jsonl rows) to every callback."""
        self._call("on_events", events)

    # ------------------------------------------------------------------ metrics
    def record(self, key: str, value: torch.Tensor) -> None:
        """Keep a statistic of the current step (a device tensor; moved at the next flush)."""
        self.step_tensors[key] = value.detach()

    def _data_parallel_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.topology.dp_size > 1:
            value = value.clone()
            dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
            value /= self.topology.dp_size
        return value

    def _record(self, stats: dict[str, torch.Tensor], step_time: float) -> None:
        """This step's row: host numbers now, device tensors until the next flush."""
        tensors = self.step_tensors  # callbacks may still add to it in on_step_end
        tensors.update(stats)
        tensors["loss"] = self.step_loss
        tensors["grad_norm"] = self.step_grad_norm.detach()
        self._pending.append({
            "step": self.step, "tensors": tensors, "lr": self.optimizer.param_groups[0]["lr"],
            "tokens": self.tokens, "time": self.elapsed, "step_time": step_time,
        })

    def flush_metrics(self) -> None:
        """Move pending statistics to the host in one transfer; hand the rows to callbacks.

        Statistics are averaged over data-parallel ranks, except maxima (keys with "max"),
        which take the maximum; every rank ends with the same rows.
        """
        if not self._pending:
            return
        layout = [(p, list(p["tensors"])) for p in self._pending]
        flat = torch.stack([p["tensors"][k].float().reshape(()) for p, keys in layout
                            for k in keys])
        if self.topology.dp_size > 1:
            is_max = torch.tensor(["max" in k for _, keys in layout for k in keys],
                                  device=flat.device)
            group = parallel_state.get_data_parallel_group()
            summed, maxed = flat.clone(), flat.clone()
            dist.all_reduce(summed, group=group)
            dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=group)
            flat = torch.where(is_max, maxed, summed / self.topology.dp_size)
        values = iter(flat.tolist())  # the one host transfer
        rates = self.throughput.interval()  # tokens/s, model FLOP/s, MFU since the last flush
        rows = []
        for pending, keys in layout:
            row = {k: v for k, v in pending.items() if k != "tensors"}
            row.update(rates)
            row.update({k: next(values) for k in keys})
            rows.append(row)
        self._pending.clear()
        self.last_metrics = rows[-1]
        self._call("on_metrics", rows)

    def _call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this rank's run exactly."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "rollbacks": self.rollbacks,
            "fault_done": self.fault.done,
            "model": self.model.state_dict(),
            "optimizer": self.engine.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.loader.state_dict(),
            "rng": rng_state(),
            "callbacks": {c.name: c.state_dict() for c in self.callbacks},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.tokens = state["tokens"]
        self.elapsed = state["elapsed"]
        self.rollbacks = state["rollbacks"]
        self.fault.done = state["fault_done"]
        self.model.load_state_dict(state["model"])
        self.engine.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        for callback in self.callbacks:
            if callback.name in state["callbacks"]:
                callback.load_state_dict(state["callbacks"][callback.name])

    def summary(self) -> dict[str, Any]:
        last = getattr(self, "last_metrics", {})
        loss = last.get("loss", float("nan"))
        status = self.status
        if status == "completed" and not math.isfinite(loss):
            status = "diverged"
        summary = {"status": status, "steps": self.step, "final_loss": loss,
                   "tokens": self.tokens, "parameters": self.num_parameters(),
                   "rollbacks": self.rollbacks, **self.throughput.summary()}
        if self.device.type == "cuda":
            summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.stop_reason:
            summary["stop_reason"] = self.stop_reason
        for callback in self.callbacks:
            summary.update(getattr(callback, "summary", dict)())
        return summary

    def num_parameters(self) -> int:
        """Parameters of the whole model (all tensor and pipeline shards; a tied embedding's
        last-stage copy is not counted again)."""
        local = sum(p.numel() for p in self.params if param_is_not_shared(p))
        replicated = sum(p.numel() for p in self.params if param_is_not_shared(p)
                         and not param_is_not_tensor_parallel_duplicate(p))
        count = torch.tensor([local - replicated + replicated / self.topology.tp_size],
                             dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(count, group=parallel_state.get_model_parallel_group())
        return int(round(count.item()))


def default_callbacks(cfg: Config, run_dir: Path, is_main: bool,
                      device: torch.device) -> list[Callback]:
    """Monitors, detectors and actions on every rank; metrics.jsonl and console on rank 0."""
    callbacks: list[Callback] = []
    if cfg.monitors.enabled:
        callbacks.append(Monitors(cfg.monitors, cfg.model.num_layers))
    if cfg.detectors.names or cfg.actions.on_nonfinite in ("skip_step", "rollback", "stop"):
        callbacks.append(SpikeWatch(cfg.detectors, cfg.actions, run_dir, is_main, device))
    if is_main:
        callbacks.append(JsonlWriter(run_dir))
        if cfg.logger.console:
            callbacks.append(ConsoleProgress(cfg.trainer.train_steps))
        if cfg.logger.wandb.mode != "disabled":
            from stability.sinks.wandb import WandbSink  # imports wandb only when it is used

            callbacks.append(WandbSink(cfg.logger.wandb))
    return callbacks


def run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Train one run into ``run_dir``; write config.yaml and summary.json; return the summary."""
    run_dir = Path(run_dir)
    launch = parallel.detect_launch()
    validate(cfg, launch.world_size)
    is_main = launch.rank == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    device = parallel.resolve_device(cfg.trainer.device)
    preemption = Preemption().install()
    try:
        trainer = Trainer(cfg, run_dir, default_callbacks(cfg, run_dir, is_main, device))
        trainer.preemption = preemption
        summary = trainer.fit()
        if is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    finally:
        parallel.shutdown()
    if summary["status"] == "preempted":
        preemption.forward()  # under submitit: requeue this job; it resumes from the checkpoint
    preemption.uninstall()
    return summary


def to_config(node: DictConfig | Config) -> Config:
    """A resolved, typed Config from Hydra's node."""
    if isinstance(node, Config):
        return node
    return OmegaConf.to_object(node)


register_configs()


def _hydra_main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    config_dir = os.environ.get("STABILITY_CONF", str(Path(__file__).parent.parent / "conf"))

    @hydra.main(config_path=config_dir, config_name="config", version_base="1.3")
    def main(node: DictConfig) -> float:
        try:
            cfg = to_config(node)
            summary = run(cfg, Path(HydraConfig.get().runtime.output_dir))
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            sys.exit(2)
        return summary["final_loss"]

    main()


if __name__ == "__main__":
    _hydra_main()
