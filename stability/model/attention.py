"""Core-attention submodules beside megatron's local ``DotProductAttention``.

A core attention takes query [sq, b, heads, d_head] and key/value [sk, b, groups, d_head] from
megatron's ``SelfAttention`` and returns the context [sq, b, heads * d_head].
"""

from __future__ import annotations

import contextlib
import math

import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """Causal attention on ``torch.nn.functional.scaled_dot_product_attention``.

    SDPA picks the fused kernel of the device (flash / memory-efficient on GPU, a fused CPU
    kernel otherwise) and never materialises the [s, s] score matrix on the flash path. Grouped
    query attention uses SDPA's ``enable_gqa`` rather than repeating keys and values.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports plain causal attention only")
        sq, b = query.shape[0], query.shape[1]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.dropout if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout else contextlib.nullcontext():
            context = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale,
                enable_gqa=self.groups != self.heads,
            )
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)



class FlashAttention(SDPAttention):
    """Causal attention through the flash-attn package (GPU, bf16/fp16 only)."""

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        from flash_attn import flash_attn_func

        sq, b = query.shape[0], query.shape[1]
        # flash-attn wants [b, s, h, d] and handles GQA natively.
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        dropout = self.dropout if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout else contextlib.nullcontext():
            context = flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=self.softmax_scale,
                                      causal=True)
        return context.transpose(0, 1).reshape(sq, b, self.heads * self.head_dim)
