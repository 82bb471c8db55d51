"""How gradients are reduced and the optimizer steps: one small interface, two paths.

- :class:`TorchEngine` (CPU, fp32): torch DDP over megatron's data-parallel group (or, under
  pipeline parallelism, one explicit all-reduce after the schedule, since torch DDP decides
  whether to reduce at forward time and 1F1B runs forwards before the last backward), torch
  AdamW, and our tensor/pipeline-aware grad norm and clip.
- ``stability.megatron_engine.MegatronEngine`` (GPU): megatron-core's DistributedDataParallel
  with overlapped reduction and its (optionally distributed) optimizer with fp32 master
  weights. Imported only on that path, so nothing GPU-only is imported on CPU.

The loop calls, per step: ``zero_grad``; the pipeline schedule on ``wrapped`` (with
``no_sync_func`` set on the model config); ``finish_grads``; ``grad_norm``; ``clip``;
``step(skip)``. ``optimizer`` is what the LR scheduler, fault injection and monitors read
(``param_groups``, ``state``). Every optimizer can skip a step on a device-side decision in the
same fused kernel (:class:`stability.optim.adamw.SkipStepAdamW`), so no engine needs to know in
advance whether a policy will ask for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from stability.optim.adamw import build_optimizer, clip_grads, grad_norm, set_hyperparameters
from stability.optim.config import OptimConfig
from stability.parallel import Topology

if TYPE_CHECKING:
    from stability.runtime import Runtime


class TorchEngine:
    """The CPU path: torch DDP (or an explicit all-reduce) and torch AdamW."""

    def __init__(self, model: torch.nn.Module, chunks: list[torch.nn.Module],
                 params: list[torch.nn.Parameter], cfg: OptimConfig, topology: Topology) -> None:
        self.model = model
        self.chunks = chunks
        self.cfg = cfg
        self.topology = topology
        self.params = params
        self.explicit_reduce = topology.dp_size > 1 and topology.pp_size > 1
        if topology.dp_size > 1 and not self.explicit_reduce:
            self.wrapped: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(
                model, process_group=parallel_state.get_data_parallel_group(),
                device_ids=[topology.device.index] if topology.device.type == "cuda" else None)
            self.no_sync_func = self.wrapped.no_sync
        else:
            # Under pipeline parallelism the schedule runs the chunks themselves (a list for
            # the interleaved schedule).
            self.wrapped = chunks[0] if len(chunks) == 1 else chunks
            self.no_sync_func = None
        self.optimizer = build_optimizer(model, cfg)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def finish_grads(self) -> None:
        """Average over data parallel (pipeline case) and sum the tied embedding's two copies."""
        if self.explicit_reduce:
            grads = [p.grad for p in self.params if p.grad is not None]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
            flat /= self.topology.dp_size
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                grad.copy_(reduced)
        all_reduce_tied_embedding_grads(self.chunks)

    def grad_norm(self) -> torch.Tensor:
        return grad_norm(self.params)

    def clip(self, norm: torch.Tensor, max_norm: float) -> None:
        clip_grads(self.params, norm, max_norm)

    def step(self, skip: torch.Tensor | None = None) -> None:
        """The optimizer step; where ``skip`` (a 0-dim bool tensor) is true, parameters and
        optimizer state stay exactly as they were."""
        self.optimizer.skip = skip
        self.optimizer.step()

    def grads(self) -> list[torch.Tensor | None]:
        """Reduced gradients aligned with the model's parameters (what the monitors read)."""
        return [p.grad for p in self.params]

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the moments and step counts; the hyperparameters (betas, eps) are this
        run's config, also when the checkpoint was written with others."""
        self.optimizer.load_state_dict(state)
        set_hyperparameters(self.optimizer.param_groups, self.cfg)


def all_reduce_tied_embedding_grads(chunks: list[torch.nn.Module]) -> None:
    """Under pipeline parallelism a tied embedding lives on the first and the last stage; both
    copies must take the same update, so their gradients are summed (megatron's
    ``_allreduce_word_embedding_grads``)."""
    if (parallel_state.get_pipeline_model_parallel_world_size() == 1
            or not chunks[0].share_embeddings_and_output_weights
            or not parallel_state.is_rank_in_embedding_group(ignore_virtual=True)):
        return
    # The first chunk holds the embedding on the first stage; the last the output layer.
    model = chunks[0] if parallel_state.is_pipeline_first_stage(ignore_virtual=True) \
        else chunks[-1]
    weight = model.shared_embedding_or_output_weight()
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=parallel_state.get_embedding_group())


def build_engine(model: torch.nn.Module, chunks: list[torch.nn.Module],
                 params: list[torch.nn.Parameter], cfg: OptimConfig, topology: Topology,
                 runtime: Runtime):
    """The torch engine on CPU; megatron-core's DDP and optimizer on GPU. ``model`` is the
    rank's model as one module; ``chunks`` its virtual pipeline stages (``[model]`` without);
    ``params`` its trainable parameters."""
    if runtime.is_cuda:
        from stability.megatron_engine import MegatronEngine  # GPU-only imports live there

        return MegatronEngine(model, chunks, params, cfg, topology, runtime)
    return TorchEngine(model, chunks, params, cfg, topology)
