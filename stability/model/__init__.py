"""megatron-core GPTModel from ModelConfig, with our submodules where megatron lacks a knob."""

from stability.model.build import build_model, causal_mask, transformer_config

__all__ = ["build_model", "causal_mask", "transformer_config"]
