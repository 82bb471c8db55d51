"""Transformer-layer specs: where the norms sit, which norm, which attention.

megatron-core's ``TransformerLayer`` is pre-norm only: ``x + F(N(x))``. We change the placement
through the layer's bias-dropout-add (bda) submodules, so the layer itself stays megatron's:

- pre:      input norms N, plain bda                      -> x + F(N(x))
- post:     no input norms, bda = N(residual + out)       -> N(x + F(x))   (original Transformer)
- sandwich: input norms N, bda = residual + N'(out)       -> x + N'(F(N(x)))  (CogView, Gemma)

Post-norm blocks end in a norm already, so the block gets no final norm.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from stability.model.attention import FlashAttention, SDPAttention, flash_attn_available


def build_norm(config: TransformerConfig, hidden_size: int | None = None):
    """A LayerNorm or RMSNorm (per ``config.normalization``) over the hidden dimension."""
    return build_module(WrappedTorchNorm, config=config,
                        hidden_size=hidden_size or config.hidden_size,
                        eps=config.layernorm_epsilon)


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


def core_attention_class(backend: str):
    """The core-attention module for ``model.attention_backend``."""
    if backend == "auto":
        backend = "flash" if flash_attn_available() else "sdpa"
    if backend == "te":
        raise ValueError("attention_backend=te is chosen through the Transformer Engine layer "
                         "spec (stability.model.te), not here")
    return {"sdpa": SDPAttention, "local": DotProductAttention, "flash": FlashAttention}[backend]


def layer_spec(config: TransformerConfig, norm_position: str, qk_layernorm: bool,
               attention_backend: str) -> ModuleSpec:
    """The spec of one transformer layer with megatron-core's local (non-TE) modules."""
    backend = LocalSpecProvider()
    input_norm = WrappedTorchNorm if norm_position in ("pre", "sandwich") else IdentityOp
    qk_norm = WrappedTorchNorm if qk_layernorm else IdentityOp
    if norm_position == "pre":
        bda = get_bias_dropout_add
    else:
        cls = PostNormAdd if norm_position == "post" else SandwichNormAdd
        bda = ModuleSpec(module=cls, params={"config": config})
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=core_attention_class(attention_backend),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=bda,
            pre_mlp_layernorm=input_norm,
            mlp=get_mlp_module_spec_for_backend(backend=backend),
            mlp_bda=bda,
        ),
    )


def block_spec(layer: ModuleSpec, num_layers: int,
               norm_position: str) -> TransformerBlockSubmodules:
    """The decoder block: ``num_layers`` copies of ``layer`` and the final norm (none for post)."""
    final_norm = None if norm_position == "post" else WrappedTorchNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)
