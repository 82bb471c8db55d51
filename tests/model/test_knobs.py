"""Each architecture knob does what it says, measured on the built megatron-core model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import build_model_for, make_config

from stability import cpu
from stability.model.build import causal_mask
from stability.model.loss import vocab_parallel_loss

VOCAB = 1000
SEQ = 32


def build(*overrides: str, seed: int = 7):
    cfg = make_config("size=tiny", f"data.seq_length={SEQ}", *overrides)
    torch.manual_seed(seed)
    cpu.seed_model_parallel_rng(seed, 0, "cpu")
    return cfg, build_model_for(cfg, VOCAB)


def forward(model, tokens=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g) if tokens is None else tokens
    positions = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
    return model(input_ids=tokens, position_ids=positions,
                 attention_mask=causal_mask(SEQ, torch.device("cpu")))


def call_order(model) -> list[str]:
    """Names of the norm / attention / MLP modules of layer 0, in the order they ran."""
    layer = model.decoder.layers[0]
    order: list[str] = []
    watched = {"input_layernorm": layer.input_layernorm,
               "self_attention": layer.self_attention,
               "pre_mlp_layernorm": layer.pre_mlp_layernorm,
               "mlp": layer.mlp}
    for name in ("self_attn_bda", "mlp_bda"):
        bda = getattr(layer, name)
        if hasattr(bda, "norm"):
            watched[f"{name}.norm"] = bda.norm
    handles = [m.register_forward_hook(lambda *_, n=n: order.append(n))
               for n, m in watched.items() if not type(m).__name__.startswith("Identity")]
    forward(model)
    for h in handles:
        h.remove()
    return order


def test_pre_norm_runs_norms_before_each_branch(single_process):
    _, model = build("recipe=llama2", "model.norm_position=pre")
    assert call_order(model) == ["input_layernorm", "self_attention", "pre_mlp_layernorm", "mlp"]
    assert model.decoder.final_layernorm is not None


def test_post_norm_normalises_after_each_residual_add(single_process):
    _, model = build("recipe=gpt", "model.norm_position=post")
    assert call_order(model) == ["self_attention", "self_attn_bda.norm", "mlp", "mlp_bda.norm"]
    assert model.decoder.final_layernorm is None
    # A post-LN layer's output is a LayerNorm output: zero mean, unit variance per token.
    outputs = []
    model.decoder.layers[0].register_forward_hook(lambda m, a, out: outputs.append(out))
    forward(model)
    hidden = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    assert torch.allclose(hidden.mean(-1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(hidden.var(-1, unbiased=False), torch.ones(()), atol=1e-3)


def test_sandwich_norm_wraps_each_branch(single_process):
    _, model = build("recipe=llama2", "model.norm_position=sandwich")
    assert call_order(model) == ["input_layernorm", "self_attention", "self_attn_bda.norm",
                                 "pre_mlp_layernorm", "mlp", "mlp_bda.norm"]


@pytest.mark.parametrize(("norm_type", "cls"), [("layernorm", torch.nn.LayerNorm),
                                                ("rmsnorm", torch.nn.RMSNorm)])
def test_norm_type(single_process, norm_type, cls):
    _, model = build(f"model.norm_type={norm_type}")
    assert type(model.decoder.layers[0].input_layernorm) is cls
    assert type(model.decoder.final_layernorm) is cls


def test_scaled_embedding_multiplies_by_sqrt_d(single_process):
    cfg, model = build("recipe=llama2", "model.scaled_embedding=true")
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    positions = torch.arange(SEQ).expand(2, SEQ)
    scaled = model.embedding(input_ids=tokens, position_ids=positions)
    raw = model.embedding.word_embeddings(tokens).transpose(0, 1)
    assert torch.allclose(scaled, raw * math.sqrt(cfg.model.hidden_size))
    _, plain = build("recipe=llama2", "model.scaled_embedding=false")
    assert torch.allclose(plain.embedding(input_ids=tokens, position_ids=positions),
                          plain.embedding.word_embeddings(tokens).transpose(0, 1))


def test_embedding_layernorm_normalises_embedding_output(single_process):
    # An embedding std far above the norm's eps, so the output variance is 1 up to eps.
    _, model = build("recipe=gpt", "model.embedding_layernorm=true",
                     "model.embedding_init_std=1.0")
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    out = model.embedding(input_ids=tokens, position_ids=torch.arange(SEQ).expand(2, SEQ))
    assert torch.allclose(out.mean(-1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(()), atol=1e-3)


def test_init_stds_measured_on_weights(single_process):
    cfg, model = build("recipe=gpt", "size=small", "model.init_std=0.01",
                       "model.embedding_init_std=0.05")
    layers = cfg.model.num_layers
    layer = model.decoder.layers[0]
    assert layer.self_attention.linear_qkv.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert layer.mlp.linear_fc1.weight.std().item() == pytest.approx(0.01, rel=0.05)
    scaled = 0.01 / math.sqrt(2 * layers)  # megatron's init of the output projections
    assert layer.self_attention.linear_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert layer.mlp.linear_fc2.weight.std().item() == pytest.approx(scaled, rel=0.05)
    emb = model.embedding.word_embeddings.weight
    assert emb.std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.all(layer.input_layernorm.weight == 1)


def test_unscaled_output_init_when_disabled(single_process):
    _, model = build("recipe=gpt", "size=small", "model.init_std=0.01",
                     "model.scaled_init_output_layers=false")
    proj = model.decoder.layers[0].self_attention.linear_proj.weight
    assert proj.std().item() == pytest.approx(0.01, rel=0.05)


def test_z_loss_matches_direct_computation(single_process):
    cfg, model = build("recipe=llama2", "loss.z_loss=1e-3")
    logits = forward(model).detach() * 5  # larger logits make the z term visible
    labels = torch.randint(0, VOCAB, logits.shape[:2])
    mask = torch.ones(labels.shape)
    mask[0, :5] = 0
    out = vocab_parallel_loss(logits, labels, mask, z_loss=1e-3)
    flat_mask = mask.flatten().bool()
    lse = torch.logsumexp(logits.float(), dim=-1).flatten()[flat_mask]
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                         reduction="none")[flat_mask].mean()
    z = 1e-3 * lse.square().mean()
    assert out.cross_entropy.item() == pytest.approx(ce.item(), rel=1e-6)
    assert out.z_loss.item() == pytest.approx(z.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx((ce + z).item(), rel=1e-6)
    assert out.logsumexp_mean.item() == pytest.approx(lse.mean().item(), rel=1e-6)
    assert out.logit_max_abs.item() == pytest.approx(logits.abs().max().item())


def test_z_loss_gradient_pulls_logsumexp_to_zero(single_process):
    logits = (torch.randn(2, 4, 50) * 3 + 4).requires_grad_()
    labels = torch.randint(0, 50, (2, 4))
    out = vocab_parallel_loss(logits, labels, torch.ones(2, 4), z_loss=1.0)
    out.loss.backward()
    direct = logits.detach().clone().requires_grad_()
    lse = torch.logsumexp(direct, -1)
    (F.cross_entropy(direct.flatten(0, 1), labels.flatten()) + lse.square().mean()).backward()
    assert torch.allclose(logits.grad, direct.grad, atol=1e-6)


def test_qk_layernorm_present_and_used(single_process):
    _, model = build("recipe=gpt", "model.qk_layernorm=true", "model.init_std=0.02")
    attn = model.decoder.layers[0].self_attention
    assert isinstance(attn.q_layernorm, torch.nn.LayerNorm)
    assert isinstance(attn.k_layernorm, torch.nn.LayerNorm)
    seen = []
    attn.q_layernorm.register_forward_hook(lambda m, a, out: seen.append(out))
    forward(model)
    # Normalised per head: every query vector has zero mean and unit variance.
    assert torch.allclose(seen[0].var(-1, unbiased=False), torch.ones(()), atol=2e-3)
    _, plain = build("recipe=gpt", "model.qk_layernorm=false")
    assert type(plain.decoder.layers[0].self_attention.q_layernorm).__name__ == "IdentityOp"


@pytest.mark.parametrize("extra", [[], ["model.num_query_groups=2"], ["recipe=gpt"]])
def test_sdpa_and_local_attention_agree(single_process, extra):
    _, sdpa = build("recipe=llama2", "model.attention_backend=sdpa", *extra, seed=3)
    _, local = build("recipe=llama2", "model.attention_backend=local", *extra, seed=3)
    assert type(sdpa.decoder.layers[0].self_attention.core_attention).__name__ == "SDPAttention"
    assert type(local.decoder.layers[0].self_attention.core_attention).__name__ == (
        "DotProductAttention")
    local.load_state_dict(sdpa.state_dict())
    torch.testing.assert_close(forward(sdpa), forward(local), atol=1e-5, rtol=1e-5)


def test_positions_activation_bias_and_tying(single_process):
    _, gpt = build("recipe=gpt")
    assert gpt.embedding.position_embeddings is not None  # learned absolute positions
    assert gpt.decoder.layers[0].self_attention.linear_qkv.bias is not None
    assert gpt.output_layer.weight is None  # tied: the output layer reads the embedding
    fc1 = gpt.decoder.layers[0].mlp.linear_fc1
    assert fc1.weight.shape[0] == 4 * 64  # GELU MLP, 4h

    _, llama = build("recipe=llama2")
    assert getattr(llama.embedding, "position_embeddings", None) is None
    assert llama.rotary_pos_emb is not None
    assert llama.decoder.layers[0].self_attention.linear_qkv.bias is None
    assert llama.output_layer.weight is not None
    fc1 = llama.decoder.layers[0].mlp.linear_fc1
    assert fc1.weight.shape[0] == 2 * 256  # SwiGLU: gate and up, LLaMA width round_up(8h/3, 256)


def test_grouped_query_attention_shapes(single_process):
    _, model = build("recipe=llama2", "model.num_query_groups=1")
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    head = 64 // 4
    assert qkv.shape[0] == 4 * head + 2 * 1 * head  # 4 query heads, 1 key and 1 value head
