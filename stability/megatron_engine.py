"""The GPU path: megatron-core's DistributedDataParallel and optimizer (imported only on GPU).

- DDP: gradients accumulate in fp32 buffers (``main_grad``) and are reduced per bucket while
  the backward pass still runs (``overlap_grad_reduce``); under pipeline parallelism megatron's
  ``finalize_model_grads`` also sums a tied embedding's first- and last-stage gradients.
- Optimizer: megatron's mixed-precision AdamW: bf16 model weights, fp32 master weights and
  moments; with ``optim.distributed=true`` those are sharded over data parallel (ZeRO-1) and
  gradients are reduce-scattered instead of all-reduced.

The step is megatron's ``prepare_grads`` -> our grad norm and clip -> ``step_with_ready_grads``:
megatron's own ``clip_grad_norm`` returns the norm as a Python float (a host sync per step),
ours stays a device tensor. The inner optimizer over the fp32 master shards is our
:class:`SkipStepAdamW` (torch's fused AdamW, which can skip a step on a device-side decision).

Monitors: per-layer gradient norms read ``main_grad`` (the reduced gradients) without the
distributed optimizer; with it each rank holds only its shard reduced, so ``grads()`` returns
None and the per-layer grad norms are not recorded (documented in docs/gpu.md). The Adam
second-moment statistic reads the master shards' state (each data-parallel rank its shard;
the flush averages the shares).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from stability.optim.adamw import SkipStepAdamW, set_hyperparameters
from stability.optim.config import OptimConfig
from stability.parallel import Topology
from stability.runtime import Runtime


class MegatronEngine:
    """megatron-core DDP + (distributed) mixed-precision optimizer, behind the engine interface."""

    def __init__(self, model: torch.nn.Module, chunks: list[torch.nn.Module],
                 params: list[torch.nn.Parameter], cfg: OptimConfig, topology: Topology,
                 runtime: Runtime) -> None:
        o = cfg
        bf16 = runtime.bf16
        self.model = model
        self.cfg = cfg
        self.params = params
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True,
            use_distributed_optimizer=o.distributed, average_in_collective=True)
        # One DDP per virtual pipeline chunk; only the first keeps bucketing (megatron-LM's
        # choice: later chunks' reductions overlap with the first chunk's backward).
        self.ddp_chunks = [
            DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)]
        self.wrapped = self.ddp_chunks[0] if len(chunks) == 1 else self.ddp_chunks
        self.no_sync_func = (self.ddp_chunks[0].no_sync if len(chunks) == 1
                             else [ddp.no_sync for ddp in self.ddp_chunks])
        self.megatron_optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps,
                clip_grad=0.0,  # we clip, on the device (see the module docstring)
                bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                use_distributed_optimizer=o.distributed),
            self.ddp_chunks)
        self.parts = list(getattr(self.megatron_optimizer, "chained_optimizers",
                                  [self.megatron_optimizer]))
        for part in self.parts:  # same parameter groups, a step that can be skipped
            part.optimizer = SkipStepAdamW(part.optimizer.param_groups, lr=o.lr,
                                           betas=(o.beta1, o.beta2), eps=o.eps,
                                           weight_decay=o.weight_decay, fused=True)
        self.optimizer = _OptimizerView(self.megatron_optimizer, self.parts)

    # ------------------------------------------------------------------ the step
    def zero_grad(self) -> None:
        for ddp in self.ddp_chunks:
            ddp.zero_grad_buffer()
        self.megatron_optimizer.zero_grad(set_to_none=True)

    def finish_grads(self) -> None:
        """Wait for the overlapped reduction; tied-embedding sums; grads to the fp32 masters."""
        finalize_model_grads(self.ddp_chunks)
        for part in self.parts:
            part.prepare_grads()  # bf16: no loss scaler, so no inf check and no host sync

    def _main_grads(self) -> list[torch.Tensor]:
        return [g for part in self.parts for g in part.get_main_grads_for_grad_norm()]

    def grad_norm(self) -> torch.Tensor:
        grads = self._main_grads()
        if grads:
            squares = torch.stack(torch._foreach_norm(grads)).float().square().sum()
        else:
            squares = torch.zeros((), device=self.params[0].device)
        # Model parallel without the distributed optimizer; the whole world with it.
        dist.all_reduce(squares, group=self.parts[0].get_grad_stats_parallel_group())
        return squares.sqrt()

    def clip(self, norm: torch.Tensor, max_norm: float) -> None:
        if max_norm <= 0:
            return
        grads = [p.grad for part in self.parts for p in part.get_parameters()
                 if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))

    def step(self, skip: torch.Tensor | None = None) -> None:
        """Where ``skip`` is true the fp32 masters, moments and step counts stay as they were
        (and so do the bf16 weights copied from them)."""
        for part in self.parts:
            part.optimizer.skip = skip
            part.step_with_ready_grads()  # inner step, masters -> bf16 weights (all-gather)

    def grads(self) -> list[torch.Tensor | None] | None:
        """Reduced gradients aligned with the model's parameters, for the monitors; None with
        the distributed optimizer (each rank holds only its shard reduced)."""
        if self.cfg.distributed:
            return None
        return [getattr(p, "main_grad", None) for p in self.params]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """This rank's inner optimizer state and fp32 master weights (its shard, if sharded)."""
        return {"inner": [part.optimizer.state_dict() for part in self.parts],
                "masters": [[p.detach().clone() for p in part.get_parameters()]
                            for part in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for part, inner, masters in zip(self.parts, state["inner"], state["masters"],
                                        strict=True):
            part.optimizer.load_state_dict(inner)
            set_hyperparameters(part.optimizer.param_groups, self.cfg)
            with torch.no_grad():
                for param, saved in zip(part.get_parameters(), masters, strict=True):
                    param.copy_(saved)
            if hasattr(part, "_copy_main_params_to_model_params"):
                part._copy_main_params_to_model_params()
        if self.cfg.distributed:
            for ddp in self.ddp_chunks:  # every rank's shard to every rank
                ddp.start_param_sync(force_sync=True)


class _OptimizerView:
    """What the scheduler, fault injection and monitors see of the optimizer: megatron's
    parameter groups and state."""

    def __init__(self, megatron_optimizer, parts) -> None:
        self._megatron = megatron_optimizer
        self._parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return self._megatron.param_groups

    @property
    def state(self):
        return self._parts[0].optimizer.state if len(self._parts) == 1 else self._megatron.state
