"""The ``model`` and ``loss`` sections of the run configuration (no torch: the CLI reads them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from stability.errors import ConfigError, in_range, one_of, positive

NORM_TYPES = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post", "sandwich")
POSITION_EMBEDDINGS = ("learned", "rope")
ACTIVATIONS = ("gelu", "swiglu")
ATTENTION_BACKENDS = ("auto", "sdpa", "local", "flash", "te")


@dataclass
class ModelConfig:
    """The transformer and every stability knob of its architecture."""

    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Model width d."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None = num_attention_heads (plain MHA)."""
    ffn_hidden_size: int | None = None
    """MLP width; None = 4d for GELU, LLaMA's round_up(8d/3, 256) for SwiGLU."""
    norm_type: str = "rmsnorm"
    """layernorm | rmsnorm."""
    norm_position: str = "pre"
    """pre (x + F(N(x))) | post (N(x + F(x))) | sandwich (x + N(F(N(x))))."""
    norm_eps: float = 1e-5
    """Epsilon of every norm."""
    scaled_embedding: bool = False
    """Multiply the embedding output by sqrt(d) ("Spike No More")."""
    embedding_layernorm: bool = False
    """Apply a norm (of norm_type) to the embedding output (BLOOM-style)."""
    init_std: float = 0.02
    """Std of the normal init of every weight matrix."""
    embedding_init_std: float | None = None
    """Std of the embedding init; None = init_std."""
    scaled_init_output_layers: bool = True
    """Megatron's init of the output projections with init_std / sqrt(2 * num_layers)."""
    qk_layernorm: bool = False
    """Normalise queries and keys per head before the dot product (Wortsman et al. 2023)."""
    position_embedding: str = "rope"
    """learned (absolute) | rope."""
    rotary_base: int = 10000
    """RoPE base."""
    activation: str = "swiglu"
    """gelu | swiglu."""
    bias: bool = False
    """Biases in linear layers."""
    tie_embeddings: bool = False
    """Share the input embedding and the output layer."""
    attention_backend: str = "auto"
    """auto (Transformer Engine > flash-attn > SDPA, by what is installed; TE and flash-attn on
    GPU only) | sdpa | local (megatron's DotProductAttention) | flash | te (TE's layer spec)."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    cpu_initialization: bool | None = None
    """Draw the initial weights on the CPU and then move them; None = on CPU runs only. true on
    a GPU starts from exactly the weights of the CPU run with the same seed (parity checks);
    slow for large models."""
    vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times the tensor-parallel size (Megatron)."""
    fusions: bool | None = None
    """megatron-core's fused kernels that need no apex: bias + activation (GELU, SwiGLU) and
    bias + dropout + add compiled by torch.compile, RoPE fused by Transformer Engine when it is
    installed; None = on GPU, off on CPU (where runs are compared bit for bit)."""
    init_from: str | None = None
    """Initial weights: None = random (init_std); "hf:DIR" = a Hugging Face Llama-architecture
    checkpoint in the local folder DIR (config.json, *.safetensors or pytorch_model.bin), each
    rank loading its shard; its tokenizer (DIR/tokenizer.json, else tokenizer.model) is used
    when data.tokenizer is None. The model keys must describe the checkpoint (a mismatch is
    refused naming the key); a checkpoint of this run, when there is one, wins on resume."""

    @property
    def query_groups(self) -> int:
        """Key/value heads the model is built with."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """The MLP width the model is built with."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.activation == "swiglu":
            return 256 * math.ceil(8 * self.hidden_size / 3 / 256)
        return 4 * self.hidden_size

    def validate(self) -> None:
        """Raise ConfigError on the first bad value of this section."""
        one_of("model.norm_type", self.norm_type, NORM_TYPES)
        one_of("model.norm_position", self.norm_position, NORM_POSITIONS)
        one_of("model.position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
        one_of("model.activation", self.activation, ACTIVATIONS)
        one_of("model.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        for key in ("num_layers", "hidden_size", "num_attention_heads"):
            positive(f"model.{key}", getattr(self, key))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("model.hidden_size", self.hidden_size,
                              f"a multiple of model.num_attention_heads="
                              f"{self.num_attention_heads}")
        positive("model.num_query_groups", self.query_groups)
        if self.num_attention_heads % self.query_groups:
            raise ConfigError("model.num_attention_heads", self.num_attention_heads,
                              f"a multiple of model.num_query_groups={self.query_groups}")
        if self.ffn_hidden_size is not None:
            positive("model.ffn_hidden_size", self.ffn_hidden_size)
        positive("model.norm_eps", self.norm_eps)
        positive("model.init_std", self.init_std)
        if self.embedding_init_std is not None:
            positive("model.embedding_init_std", self.embedding_init_std)
        positive("model.rotary_base", self.rotary_base)
        positive("model.vocab_size_divisible_by", self.vocab_size_divisible_by)
        in_range("model.hidden_dropout", self.hidden_dropout, 0.0, 1.0)
        in_range("model.attention_dropout", self.attention_dropout, 0.0, 1.0)
        if self.init_from is not None and (not self.init_from.startswith("hf:")
                                           or len(self.init_from) == 3):
            raise ConfigError("model.init_from", self.init_from,
                              'null or "hf:DIR" (a local Hugging Face checkpoint folder)')

    @property
    def init_from_dir(self) -> str | None:
        """The folder of ``init_from`` ("hf:DIR" -> DIR), or None."""
        return self.init_from[3:] if self.init_from else None


@dataclass
class LossConfig:
    """The training objective."""

    z_loss: float = 0.0
    """Coefficient of the z-loss, coef * mean(logsumexp(logits)^2); 0 = off (PaLM uses 1e-4)."""
    scale: float = 1.0
    """Multiply the objective by this before backward (logged losses are not scaled). Adam is
    invariant to it except through eps (and clipping, in absolute units), so a small scale
    emulates the small gradients of a large model at small scale (Wortsman et al. 2023, 3.4)."""

    def validate(self) -> None:
        positive("loss.z_loss", self.z_loss, zero_ok=True)
        positive("loss.scale", self.scale)
