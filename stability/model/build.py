"""Build megatron-core's GPTModel from our ModelConfig."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel as MegatronGPTModel
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from stability.model.backends import backend_available
from stability.model.config import ModelConfig
from stability.model.layers import (
    LocalColumnLinear,
    block_spec,
    build_norm,
    is_plain,
    layer_spec,
)

if TYPE_CHECKING:
    from stability.runtime import Runtime


def padded_vocab_size(vocab_size: int, model: ModelConfig, tensor_parallel: int) -> int:
    """Megatron's vocabulary padding: a multiple of divisible_by * TP, for even shards."""
    multiple = model.vocab_size_divisible_by * tensor_parallel
    return multiple * math.ceil(vocab_size / multiple)


def transformer_config(m: ModelConfig, runtime: Runtime, *, tensor: int = 1, pipeline: int = 1,
                       virtual_pipeline: int | None = None) -> TransformerConfig:
    """megatron-core's TransformerConfig for our model on ``runtime`` in a parallel layout."""
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.query_groups,
        ffn_hidden_size=m.ffn_size,
        kv_channels=m.hidden_size // m.num_attention_heads,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        layernorm_epsilon=m.norm_eps,
        normalization="RMSNorm" if m.norm_type == "rmsnorm" else "LayerNorm",
        add_bias_linear=m.bias,
        add_qkv_bias=m.bias,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        init_method_std=m.init_std,
        embedding_init_method_std=m.embedding_init_std,
        output_layer_init_method=(None if m.scaled_init_output_layers
                                  else init_method_normal(m.init_std)),
        qk_layernorm=m.qk_layernorm,
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        pipeline_dtype=runtime.params_dtype,
        params_dtype=runtime.params_dtype,
        bf16=runtime.bf16,
        # Initialise the full matrices on CPU and then shard them: a TP=2 model starts from
        # exactly the weights of the TP=1 model (parity tests). On GPU only when asked
        # (model.cpu_initialization): slow for large models.
        use_cpu_initialization=runtime.cpu_initialization,
        perform_initialization=True,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        # Fusions that need no apex (Runtime.fusions: on GPU by default): megatron compiles
        # bias+GELU/SwiGLU and bias+dropout+add with torch.compile; RoPE's fused kernel is
        # Transformer Engine's. Megatron's fused GELU needs a bias. The apex-only ones (masked
        # softmax, persistent layer norm, gradient-accumulation fusion) stay off; the TE spec
        # fuses the norms into its linears on its own.
        bias_activation_fusion=runtime.fusions and (m.activation == "swiglu" or m.bias),
        bias_dropout_fusion=runtime.fusions,
        apply_rope_fusion=(runtime.fusions and m.position_embedding == "rope"
                           and backend_available("te", runtime.device_type)),
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # Pipeline sends and receives one by one on gloo: batched (batch_isend_irecv) they race
        # there (megatron guards them with torch.cuda.synchronize), and the interleaved
        # schedule then reads a stage's input before it arrived.
        batch_p2p_comm=runtime.is_cuda,
    )


def causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """megatron's boolean attention mask [1, 1, s, s], True where attention is not allowed.

    Passed explicitly: megatron's default mask is built on "cuda". SDPA ignores it (is_causal).
    """
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device),
                      diagonal=1)[None, None]


class GPTModel(MegatronGPTModel):
    """megatron-core's GPTModel plus the embedding knobs megatron lacks.

    ``scaled_embedding`` multiplies the embedding output by sqrt(d) (Takase et al. 2023, "Spike
    No More"); ``embedding_layernorm`` normalises it. Both act through a forward hook on the
    embedding, so the model's parameters and state-dict keys stay megatron's.

    ``output_in_loss``: where the output layer is a plain matmul (one tensor-parallel rank, no
    sequence parallelism), the loss may apply it: inside :meth:`hidden_output` the last stage
    returns its final hidden states [b, s, h] instead of logits, and
    ``stability.model.loss.language_model_loss`` applies :meth:`output_weight` block by block.
    Outside, the model returns logits as megatron's does.
    """

    def __init__(self, *args, scaled_embedding: bool = False, embedding_layernorm: bool = False,
                 output_in_loss: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.post_process:  # megatron builds it inline; the same module, plain on one rank
            self.output_layer.__class__ = LocalColumnLinear
        self.output_in_loss = output_in_loss and self.post_process and is_plain(
            self.output_layer)
        self.embedding_scale = math.sqrt(self.config.hidden_size) if scaled_embedding else 1.0
        self.embedding_norm = build_norm(self.config) if (embedding_layernorm and
                                                          self.pre_process) else None
        if self.pre_process and (scaled_embedding or embedding_layernorm):
            self.embedding.register_forward_hook(self._after_embedding)
        if self.post_process and not self.config.sequence_parallel:
            # megatron computes logits sequence-major [s, b, v] and then copies them to [b, s, v]
            # (forward, and back in backward): three passes over the largest tensor of a small
            # model, 7% of a step at size=small. Computing them batch-major from the start turns
            # that transpose into a view. (Under sequence parallelism the output layer gathers
            # along the sequence dimension, so the order must stay.)
            self.output_layer.register_forward_pre_hook(_batch_major_input)
            self.output_layer.register_forward_hook(_sequence_major_view)

    @contextlib.contextmanager
    def hidden_output(self) -> Iterator[None]:
        """Within: a model with ``output_in_loss`` returns its final hidden states (the trainer's
        and the evaluator's forward passes); any other returns its logits."""
        if not self.output_in_loss:
            yield
            return
        self.output_layer.defer_to_loss = True
        try:
            yield
        finally:
            self.output_layer.defer_to_loss = False

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight [vocab, hidden]: the embedding's when they are tied."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

    def _after_embedding(self, module, args, output):
        if self.embedding_scale != 1.0:
            output = output * self.embedding_scale
        if self.embedding_norm is not None:
            output = self.embedding_norm(output)
        return output


def _batch_major_input(module, args):
    hidden_states, *rest = args
    return (hidden_states.transpose(0, 1).contiguous(), *rest)


def _sequence_major_view(module, args, output):
    logits, bias = output
    return logits.transpose(0, 1), bias


def build_model(m: ModelConfig, runtime: Runtime, *, vocab_size: int, seq_length: int,
                seed: int, tensor: int = 1, pipeline: int = 1,
                virtual_pipeline: int | None = None, vp_stage: int | None = None,
                output_in_loss: bool = False) -> GPTModel:
    """The model chunk of this rank (its pipeline stage ``vp_stage`` and tensor shard), on the
    CPU; the caller moves it to the runtime's device. ``seed`` seeds each layer's init.
    ``output_in_loss``: see :class:`GPTModel` (the trainer sets it for fp32 CPU runs).

    In bf16 every parameter is bf16 (fp32 masters live in the optimizer), as megatron's
    Float16Module makes them: megatron builds torch's norms (``WrappedTorchNorm``) in fp32, and
    a norm with fp32 weights on bf16 activations takes torch's slow unfused path.
    """
    config = transformer_config(m, runtime, tensor=tensor, pipeline=pipeline,
                                virtual_pipeline=virtual_pipeline)
    layer = layer_spec(config, m.norm_position, m.qk_layernorm, runtime.attention_backend,
                       init_seed=seed)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(layer, num_layers, m.norm_position),
        vocab_size=padded_vocab_size(vocab_size, m, tensor),
        max_sequence_length=seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope" if m.position_embedding == "rope" else "learned_absolute",
        rotary_base=m.rotary_base,
        vp_stage=vp_stage,
        scaled_embedding=m.scaled_embedding,
        embedding_layernorm=m.embedding_layernorm,
        output_in_loss=output_in_loss,
    )
    return model.to(dtype=runtime.params_dtype) if runtime.bf16 else model


def compile_model(model: torch.nn.Module) -> None:
    """``torch.compile`` a model chunk's forward and backward (inductor), in place.

    ``nn.Module.compile`` keeps the module itself: the same parameters, the same state-dict
    keys (no ``_orig_mod.`` prefix of a wrapping ``OptimizedModule``) in checkpoints and HF
    exports, and forward hooks registered later (the monitors' probes) still run, traced into
    the graph. Compilation happens at the first forward.

    megatron's RoPE table stays eager: its forward is an ``lru_cache`` that on the CPU moves
    its buffer with ``torch.cuda.current_device()`` (``stability.cpu``), which dynamo cannot
    trace. So the model runs as two graphs (embedding; decoder and output layer) with one
    break between them, where the cached table is read.
    """
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is not None:
        rotary.forward = torch.compiler.disable(rotary.forward)
    model.compile()
