"""Transformer-layer specs: where the norms sit, which norm, which attention.

megatron-core's ``TransformerLayer`` is pre-norm only: ``x + F(N(x))``. We change the placement
through the layer's bias-dropout-add (bda) submodules, so the layer itself stays megatron's:

- pre:      input norms N, plain bda                      -> x + F(N(x))
- post:     no input norms, bda = N(residual + out)       -> N(x + F(x))   (original Transformer)
- sandwich: input norms N, bda = residual + N'(out)       -> x + N'(F(N(x)))  (CogView, Gemma)

Post-norm blocks end in a norm already, so the block gets no final norm.

Two module sets: megatron-core's local modules with our core attention (SDPA, flash-attn or
megatron's own), or Transformer Engine's (GPU), where the input norms fuse into the following
linear layer (``TELayerNormColumnParallelLinear``) and attention is TE's fused kernel. The norm
placement is built the same way on both; TE is imported only when its spec is asked for.
"""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from stability.model.attention import FlashAttention, SDPAttention


def build_norm(config: TransformerConfig, hidden_size: int | None = None):
    """A LayerNorm or RMSNorm (per ``config.normalization``) over the hidden dimension."""
    return build_module(WrappedTorchNorm, config=config,
                        hidden_size=hidden_size or config.hidden_size,
                        eps=config.layernorm_epsilon)


def is_plain(linear: ColumnParallelLinear | RowParallelLinear) -> bool:
    """Can this linear layer run as a plain matmul (one tensor-parallel rank, nothing fused or
    deferred)? Checked per call: the tensor-parallel size is fixed when it is built."""
    c = linear.config
    return (linear.tp_group.size() == 1 and not linear.sequence_parallel
            and not linear.gradient_accumulation_fusion
            and not c.defer_embedding_wgrad_compute
            and not getattr(c, "delay_wgrad_compute", False))


class LocalColumnLinear(ColumnParallelLinear):
    """megatron's ColumnParallelLinear; on one tensor-parallel rank its forward is megatron's
    own math (``matmul(x, W^T) + b``) under plain autograd instead of megatron's autograd
    Function, whose Python bookkeeping and copies cost a few percent of a small CPU model's
    step. Same parameters, same results (the step-40 losses are bit-identical).

    ``defer_to_loss`` (the model's output layer, set by ``GPTModel(output_in_loss=True)``): the
    input passes through unchanged and the loss applies the weight."""

    defer_to_loss = False

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if self.defer_to_loss:
            return input_, None
        if weight is not None or not is_plain(self):
            return super().forward(input_, weight, runtime_gather_output)
        output = torch.matmul(input_, self.weight.t())
        if self.bias is not None and not self.skip_bias_add:
            output = output + self.bias
        return output, (self.bias if self.skip_bias_add else None)


class LocalRowLinear(RowParallelLinear):
    """megatron's RowParallelLinear, plain on one tensor-parallel rank (see
    :class:`LocalColumnLinear`)."""

    def forward(self, input_):
        if not is_plain(self) or self.explicit_expert_comm:
            return super().forward(input_)
        output = torch.matmul(input_, self.weight.t())
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None


class PostNormAdd(MegatronModule):
    """Bias-dropout-add followed by a norm: ``N(residual + dropout(out + bias))``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config=config)
        self.norm = build_norm(config)

    def forward(self, training: bool, fused: bool):
        add = get_bias_dropout_add(training, False)
        return lambda out_with_bias, residual, prob: self.norm(add(out_with_bias, residual, prob))


class SandwichNormAdd(MegatronModule):
    """A norm on the branch output before the residual add: ``residual + N(out + bias)``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config=config)
        self.norm = build_norm(config)

    def forward(self, training: bool, fused: bool):
        add = get_bias_dropout_add(training, False)

        def apply(out_with_bias, residual, prob):
            out, bias = out_with_bias
            out = out if bias is None else out + bias
            return add((self.norm(out), None), residual, prob)

        return apply


class SeededTransformerLayer(TransformerLayer):
    """megatron's TransformerLayer, initialised from its own seed, (init_seed, layer_number).

    Without it a layer's initial weights depend on how many random numbers the layers built
    before it on the same rank drew, so a pipeline stage starting at layer 3 would not get the
    weights layer 3 gets in one process. With it every pipeline layout starts from the same
    model (the parity tests), and the layers after a stage take the same stream too.
    """

    def __init__(self, config: TransformerConfig, *args, init_seed: int, **kwargs) -> None:
        local = kwargs.get("layer_number", args[1] if len(args) > 1 else 1)
        offset = get_transformer_layer_offset(config, kwargs.get("vp_stage"))
        torch.manual_seed(init_seed * 1000 + local + offset)  # the global layer number
        super().__init__(config, *args, **kwargs)


def core_attention_class(backend: str):
    """The core-attention module of the local layer spec for a resolved attention backend
    (``Runtime.attention_backend``: sdpa, local or flash)."""
    if backend == "te":
        raise ValueError("attention_backend=te is the Transformer Engine layer spec "
                         "(layer_spec), not a core attention of the local one")
    return {"sdpa": SDPAttention, "local": DotProductAttention, "flash": FlashAttention}[backend]


def layer_spec(config: TransformerConfig, norm_position: str, qk_layernorm: bool,
               attention_backend: str, init_seed: int = 0) -> ModuleSpec:
    """The spec of one transformer layer: Transformer Engine's modules when the backend
    resolves to te, else megatron-core's local modules with our core attention."""
    if attention_backend == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        backend = TESpecProvider()
        core_attention = backend.core_attention()
        qk_norm_module = backend.layer_norm(for_qk=True)
        fuse_input_norm = norm_position in ("pre", "sandwich")
    else:
        backend = _LocalLinears()
        core_attention = core_attention_class(attention_backend)
        qk_norm_module = WrappedTorchNorm
        fuse_input_norm = False
    has_input_norm = norm_position in ("pre", "sandwich")
    # A fused norm sits inside the linear layer; otherwise a separate one (or none, post-norm).
    input_norm = WrappedTorchNorm if has_input_norm and not fuse_input_norm else IdentityOp
    linear_in = (backend.column_parallel_layer_norm_linear() if fuse_input_norm
                 else backend.column_parallel_linear())
    qk_norm = qk_norm_module if qk_layernorm else IdentityOp
    if norm_position == "pre":
        bda = get_bias_dropout_add
    else:
        cls = PostNormAdd if norm_position == "post" else SandwichNormAdd
        bda = ModuleSpec(module=cls, params={"config": config})
    if fuse_input_norm:
        mlp = get_mlp_module_spec_for_backend(backend=backend)
    else:
        mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(
            linear_fc1=backend.column_parallel_linear(),
            linear_fc2=backend.row_parallel_linear()))
    return ModuleSpec(
        module=SeededTransformerLayer,
        params={"init_seed": init_seed},
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=linear_in,
                    core_attention=core_attention,
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=bda,
            pre_mlp_layernorm=input_norm,
            mlp=mlp,
            mlp_bda=bda,
        ),
    )


class _LocalLinears(LocalSpecProvider):
    """megatron's local modules, with linear layers that run plain on one rank."""

    def column_parallel_linear(self) -> type:
        return LocalColumnLinear

    def row_parallel_linear(self) -> type:
        return LocalRowLinear


def block_spec(layer: ModuleSpec, num_layers: int,
               norm_position: str) -> TransformerBlockSubmodules:
    """The decoder block: ``num_layers`` copies of ``layer`` and the final norm (none for post)."""
    final_norm = None if norm_position == "post" else WrappedTorchNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)
