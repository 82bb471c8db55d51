"""The fused loss equals cross-entropy + z-loss written directly in autograd, gradients too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stability.model.loss import language_model_loss, linear_vocab_loss, vocab_parallel_loss


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


@pytest.mark.parametrize("vocab", [8192, 50])  # 8192: 256 rows per block, 600 rows = 3 blocks
def test_linear_loss_equals_the_loss_of_its_logits(single_process, vocab):
    """The output layer inside the loss, block by block: the same loss values (the same sums)
    as the loss of the whole logits, and the gradients of both inputs, also scaled from above
    as the pipeline schedule scales them."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(600, 1, 32, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, 32, generator=gen) * 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (600, 1), generator=gen)
    mask = (torch.rand(600, 1, generator=gen) > 0.2).float()

    fused = linear_vocab_loss(hidden, weight, labels, mask, z_loss=1e-2)
    (fused.loss * 0.25).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    whole = vocab_parallel_loss(hidden @ weight.t(), labels, mask, z_loss=1e-2)
    (whole.loss * 0.25).backward()

    for field in ("loss", "cross_entropy", "z_loss", "logsumexp_mean", "logit_max_abs"):
        assert getattr(fused, field).item() == getattr(whole, field).item(), field
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        assert linear_vocab_loss(hidden, weight, labels, mask, 0.0).loss.item() == \
            vocab_parallel_loss(hidden @ weight.t(), labels, mask, 0.0).loss.item()


@pytest.mark.parametrize("recipe", ["gpt", "llama2"])  # tied and untied output weights
def test_model_that_leaves_its_output_layer_to_the_loss(single_process, recipe):
    """A model built with ``output_in_loss`` (the trainer's on the CPU) returns its final hidden
    states inside ``hidden_output`` and its logits outside; the loss of its hidden states equals
    the loss of the same model's logits, and so do the gradients."""
    from helpers import build_model_for, make_config

    from stability import cpu
    from stability.model.build import causal_mask

    cfg = make_config("size=tiny", f"recipe={recipe}", "data.seq_length=32")
    models = []
    for output_in_loss in (False, True):
        torch.manual_seed(3)
        cpu.seed_model_parallel_rng(3, 0, "cpu")
        models.append(build_model_for(cfg, 1000, output_in_loss=output_in_loss))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (2, 33), generator=gen)
    results = []

    def forward(model):
        return model(input_ids=tokens[:, :-1], position_ids=torch.arange(32).expand(2, 32),
                     attention_mask=causal_mask(32, torch.device("cpu")))

    for model in models:
        with model.hidden_output():
            output = forward(model)
        out = language_model_loss(model, output, tokens[:, 1:], torch.ones(2, 32), 1e-4)
        out.loss.backward()
        results.append((output.shape, out.loss.item(),
                        {n: p.grad for n, p in model.named_parameters()}))
    (logits_shape, logits_loss, logits_grads), (hidden_shape, hidden_loss, hidden_grads) = results
    assert not models[0].output_in_loss and models[1].output_in_loss
    with torch.no_grad():
        assert torch.equal(forward(models[1]), forward(models[0]))  # outside: logits
    assert logits_shape[-1] == models[0].vocab_size and hidden_shape[-1] == cfg.model.hidden_size
    assert hidden_loss == logits_loss
    assert logits_grads.keys() == hidden_grads.keys()
    for name, grad in logits_grads.items():
        torch.testing.assert_close(hidden_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
