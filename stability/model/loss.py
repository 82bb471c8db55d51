"""Cross-entropy with z-loss on vocabulary-parallel logits.

Under tensor parallelism each rank holds a slice of the vocabulary. The logsumexp and the target
logit are reduced over the tensor-parallel group with megatron's
``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity backward), which is
the exact gradient of a sum over shards. One pass over the logits gives the cross-entropy, the
z-loss (PaLM: coef * logsumexp^2) and the output-logit statistics the monitors watch.

The logits are the largest tensor of a small model (8192-wide vocabulary at hidden 256), and the
element-wise passes of an autograd-traced logsumexp cost about as much as the output layer's
matmul on CPU. ``_LogSumExpAndTarget`` computes logsumexp and the target logit in its own
forward and writes the gradient in one pass in backward, row chunks at a time so that each
chunk stays in cache on CPU (one chunk on GPU). The z-loss and masking stay plain autograd.

On the CPU at one tensor-parallel rank the loss also owns the output layer
(:func:`linear_vocab_loss`): logits are computed a block of rows at a time, and each block's
gradient, with respect to the hidden states and the output weight, is computed at once while
the block is still in cache. The full ``[tokens, vocab]`` logits never exist, which saves their
memory traffic: 17% of the output layer and loss at size=small (``docs/speed.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass
class LossOutput:
    """The differentiable objective and detached statistics (device tensors, no host sync)."""

    loss: torch.Tensor
    """cross_entropy + z_loss, what backward() sees."""
    cross_entropy: torch.Tensor
    z_loss: torch.Tensor
    logsumexp_mean: torch.Tensor
    logit_max_abs: torch.Tensor


class _LogSumExpAndTarget(torch.autograd.Function):
    """(logsumexp, target logit, max |logit|) per token of vocabulary-parallel logits [N, V/TP].

    Backward: d logsumexp / d x = softmax(x), d target / d x = one-hot(label); the softmax is
    recomputed from the saved logsumexp rather than kept from the forward.
    """

    @staticmethod
    def forward(ctx, logits, labels):
        group = parallel_state.get_tensor_model_parallel_group()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rows, vocab_local = logits.shape
        # Row maxima and the global minimum: amax and amin are vectorised reductions (CPU:
        # 1 ms each at 1024 x 8192), where a row-wise aminmax takes 18 ms.
        shift = logits.amax(dim=-1).float()
        abs_max = torch.maximum(shift.max(), -logits.amin().float())
        if tp > 1:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(abs_max, op=dist.ReduceOp.MAX, group=group)
        chunk = _chunk_rows(logits)
        sum_exp = torch.empty(rows, device=logits.device)
        part = torch.empty((min(chunk, rows), vocab_local), device=logits.device)
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            buffer = part[:end - start]  # one cache-sized buffer, reused chunk after chunk
            torch.sub(logits[start:end], shift[start:end, None], out=buffer)
            torch.sum(buffer.exp_(), dim=-1, out=sum_exp[start:end])
        if tp > 1:
            dist.all_reduce(sum_exp, group=group)
        logsumexp = sum_exp.log_().add_(shift)

        first = parallel_state.get_tensor_model_parallel_rank() * vocab_local
        local = labels - first
        inside = (local >= 0) & (local < vocab_local)
        local = local.clamp(0, vocab_local - 1)
        target = logits.gather(-1, local[:, None]).squeeze(-1).float().masked_fill(~inside, 0.0)
        if tp > 1:
            dist.all_reduce(target, group=group)
        ctx.save_for_backward(logits, logsumexp, local, inside)
        ctx.mark_non_differentiable(abs_max)
        return logsumexp, target, abs_max

    @staticmethod
    def backward(ctx, grad_logsumexp, grad_target, _):
        logits, logsumexp, local, inside = ctx.saved_tensors
        grad = torch.empty_like(logits)
        chunk = _chunk_rows(logits)
        for start in range(0, logits.shape[0], chunk):
            rows = slice(start, start + chunk)
            if grad.dtype == torch.float32:  # straight into the gradient: no copy
                softmax = torch.sub(logits[rows], logsumexp[rows, None], out=grad[rows])
                softmax.exp_().mul_(grad_logsumexp[rows, None])
            else:  # fp32 softmax, then rounded to the logits' dtype
                softmax = (logits[rows].float() - logsumexp[rows, None]).exp_()
                grad[rows] = softmax.mul_(grad_logsumexp[rows, None])
        grad.scatter_add_(-1, local[:, None],
                          (grad_target * inside).to(grad.dtype)[:, None])
        return grad, None


class _LinearVocabLoss(torch.autograd.Function):
    """Cross-entropy + z-loss of ``hidden @ weight^T`` (one rank's whole vocabulary), averaged
    over the tokens of ``mask``.

    With w_i = mask_i / sum(mask), the gradient with respect to logit (i, j) is
    w_i ((1 + 2 z lse_i) softmax_ij - [j = y_i]): known in the forward, so each block of rows is
    differentiated as soon as its logits exist (the technique of Liger-Kernel's fused linear
    cross-entropy). Backward scales the saved gradients by the incoming one (the schedule's
    1/micro-batches, ``loss.scale``). Returns (loss, cross-entropy, z-loss, mean logsumexp,
    max |logit|); only the loss is differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, mask, z_loss, grads):
        rows = hidden.shape[0]
        chunk = _linear_chunk_rows(weight)
        logsumexp = torch.empty(rows, device=hidden.device)
        target = torch.empty(rows, device=hidden.device)
        row_abs_max = torch.empty(rows, device=hidden.device)
        denom = mask.sum().clamp(min=1.0)
        ctx.grads = grads  # False in evaluation: the forward alone
        if ctx.grads:
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.empty_like(weight)
            token_weight = mask / denom
        buffer = torch.empty((min(chunk, rows), weight.shape[0]), device=hidden.device)
        for start in range(0, rows, chunk):
            block = slice(start, min(start + chunk, rows))
            h = hidden[block]
            logits = torch.mm(h, weight.t(), out=buffer[:h.shape[0]])
            shift = logits.amax(dim=-1)
            torch.maximum(shift, logits.amin(dim=-1).neg_(), out=row_abs_max[block])
            target[block] = logits.gather(-1, labels[block, None]).squeeze(-1)
            exp = logits.sub_(shift[:, None]).exp_()  # the logits are overwritten from here
            sum_exp = exp.sum(dim=-1)
            logsumexp[block] = sum_exp.log().add_(shift)
            if ctx.grads:
                w = token_weight[block]
                grad_logits = exp.mul_((w * (1 + 2 * z_loss * logsumexp[block]) / sum_exp)[:, None])
                grad_logits.scatter_add_(-1, labels[block, None], -w[:, None])
                torch.mm(grad_logits, weight, out=grad_hidden[block])
                if start == 0:
                    torch.mm(grad_logits.t(), h, out=grad_weight)
                else:
                    grad_weight.addmm_(grad_logits.t(), h)
        if ctx.grads:
            ctx.save_for_backward(grad_hidden, grad_weight)
        cross_entropy, z_term, logsumexp_mean = _token_means(logsumexp, target, mask, z_loss)
        total = cross_entropy + z_term if z_loss else cross_entropy.clone()
        abs_max = row_abs_max.max()
        ctx.mark_non_differentiable(cross_entropy, z_term, logsumexp_mean, abs_max)
        return total, cross_entropy, z_term, logsumexp_mean, abs_max

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if not ctx.grads:
            return None, None, None, None, None, None
        # In place: a second backward through this graph (retain_graph) then fails loudly on
        # the saved tensors' version counters instead of reusing scaled gradients.
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden.mul_(grad_loss), grad_weight.mul_(grad_loss), None, None, None, None


def linear_vocab_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      loss_mask: torch.Tensor, z_loss: float) -> LossOutput:
    """:func:`vocab_parallel_loss` of the logits ``hidden @ weight^T`` on one tensor-parallel
    rank (``weight``: the whole output layer, [vocab, hidden]), computed block by block without
    materialising the logits. ``hidden`` [..., hidden]; labels and mask [...]; fp32."""
    total, cross_entropy, z_term, logsumexp_mean, abs_max = _LinearVocabLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
        loss_mask.reshape(-1).float(), float(z_loss),
        torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad))
    return LossOutput(loss=total, cross_entropy=cross_entropy,
                      z_loss=z_term if z_loss else torch.zeros_like(cross_entropy),
                      logsumexp_mean=logsumexp_mean, logit_max_abs=abs_max)


def _linear_chunk_rows(weight: torch.Tensor) -> int:
    """Rows of logits per block in :func:`linear_vocab_loss`: about 8 MiB of fp32 logits (the
    fastest block size at size=small on this project's CPU: small enough for the cache, large
    enough for the output weight's gradient matmul)."""
    return max(1, (1 << 21) // weight.shape[0])


def _chunk_rows(logits: torch.Tensor) -> int:
    """Rows per chunk: about 1 MiB of fp32 logits on CPU (cache-sized), all rows on GPU."""
    if logits.is_cuda:
        return max(1, logits.shape[0])
    return max(1, (1 << 18) // logits.shape[-1])


def vocab_parallel_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                        z_loss: float) -> LossOutput:
    """Token-mean cross-entropy and z-loss of logits [..., vocab/TP] against labels [...]."""
    vocab_local = logits.shape[-1]
    logsumexp, target, abs_max = _LogSumExpAndTarget.apply(
        logits.reshape(-1, vocab_local), labels.reshape(-1))
    cross_entropy, z_term, logsumexp_mean = _token_means(
        logsumexp, target, loss_mask.reshape(-1).float(), z_loss)
    total = cross_entropy + z_term if z_loss else cross_entropy
    return LossOutput(
        loss=total,
        cross_entropy=cross_entropy.detach(),
        z_loss=z_term.detach() if z_loss else torch.zeros_like(cross_entropy.detach()),
        logsumexp_mean=logsumexp_mean.detach(),
        logit_max_abs=abs_max,
    )


def _token_means(logsumexp: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                 z_loss: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cross-entropy, z-loss, mean logsumexp) over the tokens of ``mask``: both losses sum in
    this one order, so the fused one's values equal the other's bit for bit."""
    denom = mask.sum().clamp(min=1.0)
    cross_entropy = ((logsumexp - target) * mask).sum() / denom
    z_term = z_loss * (logsumexp.square() * mask).sum() / denom
    return cross_entropy, z_term, (logsumexp.detach() * mask).sum() / denom


def language_model_loss(model: torch.nn.Module, output: torch.Tensor, labels: torch.Tensor,
                        loss_mask: torch.Tensor, z_loss: float) -> LossOutput:
    """The loss of the last pipeline stage's ``output``: its logits, or its final hidden states
    where ``model`` (that stage's chunk, a ``GPTModel``, run inside its ``hidden_output``) leaves
    the output layer to the loss."""
    if model.output_in_loss:
        return linear_vocab_loss(output, model.output_weight(), labels, loss_mask, z_loss)
    return vocab_parallel_loss(output, labels, loss_mask, z_loss)
