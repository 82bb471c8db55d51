"""AdamW with parameter groups, megatron's LR schedule, and tensor-parallel-aware clipping."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from stability.optim.config import OptimConfig

_EMBEDDING_NAMES = ("word_embeddings", "position_embeddings", "output_layer")


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups: decayed matrices, and the rest (norms, biases; embeddings if configured).

    ``wd_mult`` is read by megatron's scheduler, which sets each group's weight decay.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = any(part in name for part in _EMBEDDING_NAMES)
        if param.ndim < 2 or name.endswith(".bias") or (is_embedding and
                                                         not cfg.embedding_weight_decay):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "wd_mult": 1.0, "name": "decay"},
        {"params": no_decay, "wd_mult": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> SkipStepAdamW:
    """torch's fused AdamW over our parameter groups (CPU and CUDA: 4x faster than the foreach
    path on CPU), able to skip a step on a device-side decision."""
    return SkipStepAdamW(
        param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        weight_decay=cfg.weight_decay, fused=True,
    )


def set_hyperparameters(groups: list[dict], cfg: OptimConfig) -> None:
    """Betas and eps of ``cfg`` on every parameter group (after loading a checkpoint written
    with other values: a resume applies the config it is given; LR and weight decay are set by
    the scheduler every step)."""
    for group in groups:
        group["betas"] = (cfg.beta1, cfg.beta2)
        group["eps"] = cfg.eps


def build_scheduler(optimizer: torch.optim.Optimizer, o: OptimConfig,
                    train_steps: int) -> OptimizerParamScheduler:
    """megatron-core's OptimizerParamScheduler: linear warmup from 0, then decay to min_lr.

    The loop calls ``step(1)`` before each optimizer step, so optimizer step k (1-based) runs at
    the schedule's value for k: warmup reaches the peak LR at step ``warmup_steps``. The
    schedule is a function of the step and the config alone: a resume sets ``num_steps`` and
    keeps the config it is given (Megatron's ``--override-opt_param-scheduler``), so a changed
    LR or a longer run takes effect from the resume on.
    """
    decay_steps = o.decay_steps_for(train_steps)
    # AdamW decays by lr_t * wd: wd / lr makes that wd * lr_t / lr (independent of the peak LR).
    wd = o.weight_decay / o.lr if o.weight_decay_lr_independent else o.weight_decay
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=o.decay_style,
        start_wd=wd,
        end_wd=wd,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        wsd_decay_steps=round(o.wsd_decay_fraction * decay_steps),
        lr_wsd_decay_style="linear",
    )


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients over the whole model, as a device tensor.

    Tensor-parallel shards are summed over the tensor- and pipeline-parallel groups;
    replicated parameters (norms, row-parallel biases) and the embedding shared between the
    first and last pipeline stage are counted once. Data-parallel ranks hold averaged (equal)
    gradients already.
    """
    grads = [p.grad for p in params if p.grad is not None and param_is_not_shared(p)
             and param_is_not_tensor_parallel_duplicate(p)]
    if grads and grads[0].is_cuda:
        squares = torch.stack(torch._foreach_norm([g.float() for g in grads])).square().sum()
    elif grads:
        # Not vector_norm: on CPU its fp32 accumulation is off by ~1e-4 relative on 1e5+
        # elements, which breaks exact parity; a squared sum reduces pairwise.
        squares = torch.stack([g.float().square().sum() for g in grads]).sum()
    else:
        squares = torch.zeros((), device=_device(params))
    if parallel_state.get_model_parallel_group() is not None and (
        parallel_state.get_tensor_model_parallel_world_size() > 1
        or parallel_state.get_pipeline_model_parallel_world_size() > 1
    ):
        dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
    return squares.sqrt()


def clip_grads(params: list[torch.nn.Parameter], norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients so that their global norm is at most ``max_norm``; no host sync."""
    if max_norm <= 0:
        return
    grads = [p.grad for p in params if p.grad is not None]
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale)


def _device(params) -> torch.device:
    for p in params:
        return p.device
    return torch.device("cpu")


class SkipStepAdamW(torch.optim.AdamW):
    """torch's fused AdamW that can skip a step on a device-side decision, without a host sync.

    Set ``skip`` to a boolean 0-dim tensor before ``step()``: where it is true, parameters,
    moments and step counts stay exactly as they were (OLMo-core's SkipStepOptimizer idea). It
    rides on the fused kernel's ``found_inf`` input, the mechanism of torch's GradScaler: one
    kernel for the whole step, also when skipped, and bit-identical to not stepping. With
    ``skip`` None it is torch's fused AdamW.
    """

    skip: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        self.found_inf = None if self.skip is None else self.skip.reshape(()).float()
        return super().step(closure)
