"""Our models as transformers classes and back: which class, its config, the weights' names.

=====================================  ======================================================
our model (``model.*``)                transformers class
=====================================  ======================================================
RoPE, SwiGLU, RMSNorm, pre-norm        ``LlamaForCausalLM`` (``recipe=llama2``): GQA, biases
                                       (``attention_bias`` = ``mlp_bias``), tied or untied
learned positions, GELU, LayerNorm,    ``GPT2LMHeadModel`` (``recipe=gpt``) with
pre-norm, MHA                          ``activation_function="gelu"`` (exact erf GELU, as
                                       megatron's ``F.gelu``; GPT-2's default ``gelu_new`` is
                                       the tanh approximation); without biases, zero biases
=====================================  ======================================================

``model.scaled_embedding`` (x sqrt(d) on the embedding output, Spike No More) is folded into the
embedding tables (word and, for GPT-2, position: megatron scales their sum); with a tied output
layer it cannot be (the output layer would be scaled too). Knobs no class expresses are refused
by :func:`architecture` in one line naming the knob (:class:`Unsupported`).

Weights are converted between the **full** megatron state dict (``stability.model.shards``:
one-process names, global layer numbers) and transformers' names. Megatron's fused
``linear_qkv`` holds, per query group, its query heads then one key and one value head; Llama's
``q_proj``/``k_proj``/``v_proj`` are the same heads in order (query head i reads key/value head
i // (heads / groups) in both; both rotate halves for RoPE, so no permutation). ``linear_fc1``
holds ``[gate; up]``. GPT-2's ``Conv1D`` weights are stored transposed ([in, out]).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch

from stability.model.config import ModelConfig

LLAMA, GPT2 = "llama", "gpt2"
HF_CLASSES = {LLAMA: "LlamaForCausalLM", GPT2: "GPT2LMHeadModel"}


class Unsupported(ValueError):
    """A knob of our model that no transformers class expresses; the message is one line."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key = key
        super().__init__(f"{key}={value!r} has no Hugging Face equivalent: {reason}")


def architecture(m: ModelConfig) -> str:
    """The transformers architecture (LLAMA or GPT2) that computes exactly our model ``m``.

    Raises:
        Unsupported: Naming the first knob that no class expresses.
    """
    if m.norm_position != "pre":
        raise Unsupported("model.norm_position", m.norm_position,
                          "LlamaForCausalLM and GPT2LMHeadModel are pre-norm (x + F(N(x)))")
    if m.embedding_layernorm:
        raise Unsupported("model.embedding_layernorm", True,
                          "LlamaForCausalLM and GPT2LMHeadModel have no norm on the embedding")
    if m.scaled_embedding and m.tie_embeddings:
        raise Unsupported("model.scaled_embedding", True,
                          "with model.tie_embeddings=true the x sqrt(d) scale cannot be folded "
                          "into the embedding (the output layer shares it)")
    if m.qk_layernorm:
        raise Unsupported("model.qk_layernorm", True,
                          "LlamaForCausalLM and GPT2LMHeadModel have no query/key norms")
    if m.position_embedding == "rope":
        if m.activation != "swiglu":
            raise Unsupported("model.activation", m.activation,
                              "with RoPE the class is LlamaForCausalLM, whose MLP is SwiGLU")
        if m.norm_type != "rmsnorm":
            raise Unsupported("model.norm_type", m.norm_type,
                              "with RoPE the class is LlamaForCausalLM, which uses RMSNorm")
        return LLAMA
    if m.activation != "gelu":
        raise Unsupported("model.activation", m.activation, "with learned positions the class "
                          "is GPT2LMHeadModel, whose MLP is GELU")
    if m.norm_type != "layernorm":
        raise Unsupported("model.norm_type", m.norm_type, "with learned positions the class is "
                          "GPT2LMHeadModel, which uses LayerNorm")
    if m.query_groups != m.num_attention_heads:
        raise Unsupported("model.num_query_groups", m.num_query_groups,
                          "GPT2LMHeadModel has no grouped-query attention")
    return GPT2


def hf_config(m: ModelConfig, arch: str, *, vocab_size: int, seq_length: int,
              special_ids: Mapping[str, int | None], dtype: torch.dtype):
    """The transformers config (LlamaConfig or GPT2Config) of our model ``m``."""
    ids = {f"{name}_token_id": special_ids.get(name) for name in ("bos", "eos", "pad")}
    if arch == LLAMA:
        from transformers import LlamaConfig

        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.query_groups,
            head_dim=m.hidden_size // m.num_attention_heads, hidden_act="silu",
            max_position_embeddings=seq_length, initializer_range=m.init_std,
            rms_norm_eps=m.norm_eps, rope_theta=float(m.rotary_base),
            attention_bias=m.bias, mlp_bias=m.bias, attention_dropout=m.attention_dropout,
            tie_word_embeddings=m.tie_embeddings, **ids)
    else:
        from transformers import GPT2Config

        config = GPT2Config(
            vocab_size=vocab_size, n_positions=seq_length, n_embd=m.hidden_size,
            n_layer=m.num_layers, n_head=m.num_attention_heads, n_inner=m.ffn_size,
            activation_function="gelu", resid_pdrop=m.hidden_dropout,
            embd_pdrop=m.hidden_dropout, attn_pdrop=m.attention_dropout,
            layer_norm_epsilon=m.norm_eps, initializer_range=m.init_std,
            scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False, tie_word_embeddings=m.tie_embeddings, **ids)
    config.architectures = [HF_CLASSES[arch]]
    config.dtype = dtype
    return config


# ---------------------------------------------------------------------- fused tensors
def split_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Megatron's fused query/key/value rows (weight or bias) as (q, k, v) in head order."""
    groups, heads = m.query_groups, m.num_attention_heads
    head_dim = m.hidden_size // heads
    per_group = heads // groups
    x = qkv.reshape(groups, per_group + 2, head_dim, *qkv.shape[1:])
    q = x[:, :per_group].reshape(heads * head_dim, *qkv.shape[1:])
    k = x[:, per_group].reshape(groups * head_dim, *qkv.shape[1:])
    v = x[:, per_group + 1].reshape(groups * head_dim, *qkv.shape[1:])
    return q, k, v


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             m: ModelConfig) -> torch.Tensor:
    """The inverse of :func:`split_qkv`."""
    groups, heads = m.query_groups, m.num_attention_heads
    head_dim = m.hidden_size // heads
    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups, head_dim, *rest)
    k = k.reshape(groups, 1, head_dim, *rest)
    v = v.reshape(groups, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def embedding_scale(m: ModelConfig) -> float:
    """The factor megatron applies to the embedding output (1 without scaled_embedding)."""
    return math.sqrt(m.hidden_size) if m.scaled_embedding else 1.0


# ---------------------------------------------------------------------- ours -> transformers
def to_hf(full: Mapping[str, torch.Tensor], m: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """transformers' state dict of our full state dict ``full`` (see the module docstring)."""
    return (_to_llama if arch == LLAMA else _to_gpt2)(full, m)


def _to_llama(full: Mapping[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    scale = embedding_scale(m)
    out = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"] * scale,
           "model.norm.weight": full["decoder.final_layernorm.weight"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = full["output_layer.weight"]
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = full[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = full[src + "pre_mlp_layernorm.weight"]
        for kind in ("weight", "bias") if m.bias else ("weight",):
            q, k, v = split_qkv(full[f"{src}self_attention.linear_qkv.{kind}"], m)
            out[f"{dst}self_attn.q_proj.{kind}"] = q
            out[f"{dst}self_attn.k_proj.{kind}"] = k
            out[f"{dst}self_attn.v_proj.{kind}"] = v
            out[f"{dst}self_attn.o_proj.{kind}"] = full[f"{src}self_attention.linear_proj.{kind}"]
            gate, up = full[f"{src}mlp.linear_fc1.{kind}"].chunk(2, dim=0)
            out[f"{dst}mlp.gate_proj.{kind}"] = gate
            out[f"{dst}mlp.up_proj.{kind}"] = up
            out[f"{dst}mlp.down_proj.{kind}"] = full[f"{src}mlp.linear_fc2.{kind}"]
    return out


def _to_gpt2(full: Mapping[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    scale = embedding_scale(m)
    out = {"transformer.wte.weight": full["embedding.word_embeddings.weight"] * scale,
           "transformer.wpe.weight": full["embedding.position_embeddings.weight"] * scale,
           "transformer.ln_f.weight": full["decoder.final_layernorm.weight"],
           "transformer.ln_f.bias": full["decoder.final_layernorm.bias"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = full["output_layer.weight"]

    def bias(name: str, size: int) -> torch.Tensor:
        return full[name] if name in full else torch.zeros(size)

    d = m.hidden_size
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            out[f"{dst}{theirs}.weight"] = full[f"{src}{ours}.weight"]
            out[f"{dst}{theirs}.bias"] = full[f"{src}{ours}.bias"]
        qkv = src + "self_attention.linear_qkv."
        out[dst + "attn.c_attn.weight"] = torch.cat(split_qkv(full[qkv + "weight"], m)).t()
        out[dst + "attn.c_attn.bias"] = torch.cat(split_qkv(bias(qkv + "bias", 3 * d), m))
        proj = src + "self_attention.linear_proj."
        out[dst + "attn.c_proj.weight"] = full[proj + "weight"].t()
        out[dst + "attn.c_proj.bias"] = bias(proj + "bias", d)
        fc1, fc2 = src + "mlp.linear_fc1.", src + "mlp.linear_fc2."
        out[dst + "mlp.c_fc.weight"] = full[fc1 + "weight"].t()
        out[dst + "mlp.c_fc.bias"] = bias(fc1 + "bias", m.ffn_size)
        out[dst + "mlp.c_proj.weight"] = full[fc2 + "weight"].t()
        out[dst + "mlp.c_proj.bias"] = bias(fc2 + "bias", d)
    return {name: tensor.contiguous() for name, tensor in out.items()}


# ---------------------------------------------------------------------- transformers -> ours
class FromLlama(Mapping):
    """Our full state dict of a transformers Llama checkpoint, computed tensor by tensor on
    access (each rank reads only the tensors of its own stage).

    Args:
        read: Reads one transformers tensor by name.
        m: Our model config (shapes, biases, tied, scaled embedding: the scale is divided out
            of the embedding so that our model computes the checkpoint's function).
    """

    def __init__(self, read: Callable[[str], torch.Tensor], m: ModelConfig) -> None:
        self.read, self.m = read, m
        self._names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
        if not m.tie_embeddings:
            self._names.append("output_layer.weight")
        kinds = ("weight", "bias") if m.bias else ("weight",)
        for i in range(m.num_layers):
            p = f"decoder.layers.{i}."
            self._names += [p + "input_layernorm.weight", p + "pre_mlp_layernorm.weight"]
            self._names += [f"{p}{module}.{kind}" for kind in kinds for module in (
                "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                "mlp.linear_fc2")]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        read = self.read
        if name == "embedding.word_embeddings.weight":
            table, scale = read("model.embed_tokens.weight"), embedding_scale(self.m)
            return table if scale == 1.0 else table.float() / scale
        if name == "decoder.final_layernorm.weight":
            return read("model.norm.weight")
        if name == "output_layer.weight":
            return read("lm_head.weight")
        _, _, i, rest = name.split(".", 3)
        p = f"model.layers.{i}."
        kind = rest.rsplit(".", 1)[1]
        if rest == "input_layernorm.weight":
            return read(p + "input_layernorm.weight")
        if rest == "pre_mlp_layernorm.weight":
            return read(p + "post_attention_layernorm.weight")
        if rest.startswith("self_attention.linear_qkv."):
            return join_qkv(*(read(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"), self.m)
        if rest.startswith("self_attention.linear_proj."):
            return read(f"{p}self_attn.o_proj.{kind}")
        if rest.startswith("mlp.linear_fc1."):
            return torch.cat([read(f"{p}mlp.gate_proj.{kind}"), read(f"{p}mlp.up_proj.{kind}")])
        return read(f"{p}mlp.down_proj.{kind}")
