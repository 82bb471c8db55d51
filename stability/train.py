"""Train a megatron-core GPT model from a Hydra config: ``python -m stability.train [overrides]``.

The loop is short on purpose: a step is forward/backward over the micro batches, a global grad
norm and clip, an optimizer step; everything else (metric files, console, checkpoints, W&B,
detectors) is a callback.
"""

from __future__ import annotations

import contextlib
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
from omegaconf import DictConfig, OmegaConf

import stability  # noqa: F401  (quiets megatron-core's import warnings)
from stability import cpu, parallel
from stability.callbacks import Callback
from stability.checkpoint import Checkpointer, load_latest, rng_state, set_rng_state
from stability.config import Config, register_configs, validate
from stability.data import build_train_data
from stability.errors import ConfigError
from stability.loss import vocab_parallel_loss
from stability.model import build_model, causal_mask
from stability.optim import build_optimizer, build_scheduler, clip_grads, grad_norm
from stability.sinks.console import ConsoleProgress
from stability.sinks.jsonl import JsonlWriter


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
        self.model = build_model(cfg, self.data.tokenizer.vocab_size).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ddp = self._wrap_data_parallel(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.mask = causal_mask(cfg.data.seq_length, self.device)

        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0  # training seconds, carried over resumes
        self.status = "running"
        self.stop_requested = False
        self._pending: list[dict[str, Any]] = []
        self.callbacks: list[Callback] = callbacks if callbacks is not None else []
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.interval,
                                         cfg.checkpoint.keep_last, cfg.checkpoint.save_final)
        self.callbacks.append(self.checkpointer)

    # ------------------------------------------------------------------ set-up helpers
    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        cpu.seed_model_parallel_rng(seed, self.topology.tp_rank)

    def _wrap_data_parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.topology.dp_size == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, process_group=parallel_state.get_data_parallel_group(),
            device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to ``trainer.train_steps`` (or until a callback stops the run)."""
        if self.cfg.checkpoint.resume == "auto":
            load_latest(self, self.run_dir / "checkpoints")
        self.checkpointer.last_saved = self.step if self.step else None
        self._call("on_train_start")
        try:
            while self.step < self.cfg.trainer.train_steps and not self.stop_requested:
                self.train_step()
            self.status = "stopped" if self.stop_requested else "completed"
        except BaseException:
            self.status = "crashed"
            raise
        finally:
            self.flush_metrics()
            self._call("on_close", self.status)
        return self.summary()

    def train_step(self) -> None:
        """One optimizer step over the global batch."""
        self._call("on_step_start")
        start = time.perf_counter()
        self.scheduler.step(1)
        self.optimizer.zero_grad(set_to_none=True)
        stats = [self._forward_backward(micro) for micro in range(self.accumulation)]
        norm = grad_norm(self.params)
        clip_grads(self.params, norm, self.cfg.optim.clip_grad)
        self._call("before_optimizer_step")
        self.optimizer.step()
        self.step += 1
        self.tokens += self.cfg.trainer.global_batch_size * self.cfg.data.seq_length
        step_time = time.perf_counter() - start
        self.elapsed += step_time
        self._record(stats, norm, step_time)
        self._call("on_step_end")
        if self.step % self.cfg.trainer.log_interval == 0:
            self.flush_metrics()

    def _forward_backward(self, micro: int) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.device, non_blocking=True)
                 for k, v in self.data.loader.next_micro_batch().items()}
        last = micro == self.accumulation - 1
        use_no_sync = self.ddp is not self.model and not last
        sync = self.ddp.no_sync() if use_no_sync else contextlib.nullcontext()
        with sync:
            logits = self.ddp(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                              attention_mask=self.mask)
            out = vocab_parallel_loss(logits, batch["labels"], batch["loss_mask"],
                                      self.cfg.loss.z_loss)
            (out.loss / self.accumulation).backward()
        return {"loss": out.cross_entropy, "z_loss": out.z_loss,
                "logsumexp_mean": out.logsumexp_mean, "logit_max_abs": out.logit_max_abs}

    # ------------------------------------------------------------------ metrics
    def _record(self, stats: list[dict[str, torch.Tensor]], norm: torch.Tensor,
                step_time: float) -> None:
        """Keep this step's statistics as device tensors until the next flush."""
        values = {k: torch.stack([s[k] for s in stats]).mean() for k in ("loss", "z_loss",
                                                                          "logsumexp_mean")}
        values["logit_max_abs"] = torch.stack([s["logit_max_abs"] for s in stats]).max()
        values["grad_norm"] = norm.detach()
        tokens_step = self.cfg.trainer.global_batch_size * self.cfg.data.seq_length
        self._pending.append({
            "step": self.step, "tensors": values, "lr": self.optimizer.param_groups[0]["lr"],
            "tokens": self.tokens, "time": self.elapsed,
            "step_time": step_time, "tokens_per_s": tokens_step / max(step_time, 1e-9),
        })

    def flush_metrics(self) -> None:
        """Move pending statistics to the host in one batch and hand the rows to callbacks."""
        if not self._pending:
            return
        keys = list(self._pending[0]["tensors"])
        stacked = torch.stack([torch.stack([p["tensors"][k] for k in keys])
                               for p in self._pending])
        if self.topology.dp_size > 1:  # every rank reports the global-batch mean
            dist.all_reduce(stacked, group=parallel_state.get_data_parallel_group())
            stacked /= self.topology.dp_size
        rows = []
        for pending, values in zip(self._pending, stacked.tolist(), strict=True):
            row = {k: v for k, v in pending.items() if k != "tensors"}
            row.update(dict(zip(keys, values, strict=True)))
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
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.loader.state_dict(),
            "rng": rng_state(),
            "callbacks": {c.name: c.state_dict() for c in self.callbacks},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.tokens = state["tokens"]
        self.elapsed = state["elapsed"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
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
        return {"status": status, "steps": self.step, "final_loss": loss,
                "tokens": self.tokens, "parameters": self.num_parameters()}

    def num_parameters(self) -> int:
        """Parameters of the whole model (all tensor and pipeline shards)."""
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        local = sum(p.numel() for p in self.params)
        replicated = sum(p.numel() for p in self.params
                         if not param_is_not_tensor_parallel_duplicate(p))
        count = torch.tensor([local - replicated + replicated / self.topology.tp_size],
                             dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(count, group=parallel_state.get_model_parallel_group())
        return int(round(count.item()))




def default_callbacks(cfg: Config, run_dir: Path, is_main: bool) -> list[Callback]:
    """Sinks that every run has: metrics.jsonl and the console line (rank 0)."""
    if not is_main:
        return []
    callbacks: list[Callback] = [JsonlWriter(run_dir)]
    if cfg.logger.console:
        callbacks.append(ConsoleProgress(cfg.trainer.train_steps))
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
    trainer = Trainer(cfg, run_dir, default_callbacks(cfg, run_dir, is_main))
    try:
        summary = trainer.fit()
        if is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary
    finally:
        parallel.shutdown()


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
