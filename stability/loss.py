"""Cross-entropy with z-loss on vocabulary-parallel logits.

Under tensor parallelism each rank holds a slice of the vocabulary. The logsumexp and the target
logit are reduced over the tensor-parallel group with megatron's
``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity backward), which is
the exact gradient of a sum over shards. One pass over the logits gives the cross-entropy, the
z-loss (PaLM: coef * logsumexp^2) and the output-logit statistics the monitors watch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region


@dataclass
class LossOutput:
    """The differentiable objective and detached statistics (device tensors, no host sync)."""

    loss: torch.Tensor
    """cross_entropy + z_loss, what backward() sees."""
    cross_entropy: torch.Tensor
    z_loss: torch.Tensor
    logsumexp_mean: torch.Tensor
    logit_max_abs: torch.Tensor


def vocab_parallel_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                        z_loss: float) -> LossOutput:
    """Token-mean cross-entropy and z-loss of logits [..., vocab/TP] against labels [...]."""
    logits = logits.float()
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    vocab_local = logits.shape[-1]

    with torch.no_grad():
        shift = logits.max(dim=-1).values
        low, high = torch.aminmax(logits)
        abs_max = torch.maximum(high, -low)
        if tp > 1:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(abs_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(logits - shift.unsqueeze(-1)).sum(dim=-1)
    if tp > 1:
        sum_exp = reduce_from_tensor_model_parallel_region(sum_exp)
    logsumexp = torch.log(sum_exp) + shift

    start = parallel_state.get_tensor_model_parallel_rank() * vocab_local
    local = labels - start
    outside = (local < 0) | (local >= vocab_local)
    target = logits.gather(-1, local.clamp(0, vocab_local - 1).unsqueeze(-1)).squeeze(-1)
    target = target.masked_fill(outside, 0.0)
    if tp > 1:
        target = reduce_from_tensor_model_parallel_region(target)

    mask = loss_mask.float()
    denom = mask.sum().clamp(min=1.0)
    cross_entropy = ((logsumexp - target) * mask).sum() / denom
    z_term = z_loss * (logsumexp.square() * mask).sum() / denom
    total = cross_entropy + z_term if z_loss else cross_entropy
    return LossOutput(
        loss=total,
        cross_entropy=cross_entropy.detach(),
        z_loss=z_term.detach() if z_loss else torch.zeros_like(cross_entropy.detach()),
        logsumexp_mean=((logsumexp.detach() * mask).sum() / denom),
        logit_max_abs=abs_max,
    )
