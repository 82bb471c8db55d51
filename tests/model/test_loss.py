"""The fused loss equals cross-entropy + z-loss written directly in autograd, gradients too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stability.model.loss import vocab_parallel_loss


@pytest.mark.parametrize("vocab", [8192, 50])  # 8192: 32 rows per chunk, 97 rows = 4 chunks
def test_loss_and_gradient_match_direct_autograd(single_process, vocab):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(97, 1, vocab, generator=gen) * 4).requires_grad_()
    labels = torch.randint(0, vocab, (97, 1), generator=gen)
    mask = (torch.rand(97, 1, generator=gen) > 0.2).float()
    out = vocab_parallel_loss(logits, labels, mask, z_loss=1e-2)
    out.loss.backward()

    direct = logits.detach().double().requires_grad_()
    lse = torch.logsumexp(direct, dim=-1)
    ce = F.cross_entropy(direct.flatten(0, 1), labels.flatten(), reduction="none")
    expected = ((ce + 1e-2 * lse.flatten().square()) * mask.flatten()).sum() / mask.sum()
    expected.backward()

    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.cross_entropy.item() == pytest.approx(
        ((ce * mask.flatten()).sum() / mask.sum()).item(), rel=1e-6)
    assert out.logsumexp_mean.item() == pytest.approx(
        ((lse.flatten() * mask.flatten()).sum() / mask.sum()).item(), rel=1e-6)
    assert out.logit_max_abs.item() == logits.detach().abs().max().item()
    torch.testing.assert_close(logits.grad, direct.grad.float(), rtol=1e-5, atol=1e-8)
