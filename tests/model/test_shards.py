"""The full state dict from rank files and back: megatron-core's layouts, checked against
megatron-core's own functions (layer offsets, rank order) and round trips."""

from __future__ import annotations

import pytest
import torch

from stability.model.shards import (
    canonical,
    global_rank,
    layer_offset,
    merge,
    split_dim,
    tp_merge,
    tp_slice,
)


@pytest.mark.parametrize("layers, pp, vp", [(8, 2, None), (8, 2, 2), (8, 2, 4), (12, 3, 2),
                                            (4, 4, None)])
def test_layer_offsets_are_megatrons(layers, pp, vp):
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=2,
                               pipeline_model_parallel_size=pp,
                               virtual_pipeline_model_parallel_size=vp,
                               pipeline_dtype=torch.float32)
    for rank in range(pp):
        for stage in range(vp or 1):
            expected = get_transformer_layer_offset(config, stage if vp else None, rank)
            assert layer_offset(layers, rank, pp, stage if vp else None, vp) == expected


def test_rank_order_is_megatrons():
    from megatron.core.parallel_state import RankGenerator

    tp, dp, pp = 2, 3, 2
    ranks = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    grid = {(t, d, p): global_rank(t, p, tp, dp, dp_rank=d)
            for t in range(tp) for d in range(dp) for p in range(pp)}
    assert sorted(grid.values()) == list(range(tp * dp * pp))
    expected = {
        "tp": [[grid[t, d, p] for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[grid[t, d, p] for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[grid[t, d, p] for p in range(pp)] for d in range(dp) for t in range(tp)],
    }
    for kind, groups in expected.items():
        assert sorted(ranks.get_ranks(kind)) == sorted(groups), kind


def test_tensor_parallel_split_and_merge_round_trip():
    full = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    for rule in (0, 1, "glu", None):
        tensor = full if rule != 1 else full.t().contiguous()
        parts = [tp_slice(tensor, rule, r, 2) for r in range(2)]
        assert torch.equal(tp_merge(parts, rule), tensor)
    gate, up = full.chunk(2)  # rank r of a gated fc1 holds [gate_r; up_r]
    assert torch.equal(tp_slice(full, "glu", 1, 2), torch.cat([gate[2:], up[2:]]))
    assert split_dim("decoder.layers.3.mlp.linear_fc1.weight", gated=True) == "glu"
    assert split_dim("decoder.layers.3.mlp.linear_fc1.weight", gated=False) == 0
    assert split_dim("decoder.layers.3.self_attention.linear_proj.weight", True) == 1
    assert split_dim("decoder.layers.3.self_attention.linear_proj.bias", True) is None
    assert split_dim("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight",
                     True) is None
    assert split_dim("embedding.position_embeddings.weight", True) is None


def test_virtual_stage_chunks_merge_with_global_layer_numbers():
    # 4 layers, PP=2, 2 virtual stages: rank 0 holds layers 0 and 2, rank 1 layers 1 and 3.
    # ModelChunks saves each chunk under chunks.<v>. and its layers again under decoder.
    def rank_state(pp_rank):
        state = {}
        for v in range(2):
            value = torch.full((2,), float(layer_offset(4, pp_rank, 2, v, 2)))
            state[f"chunks.{v}.decoder.layers.0.input_layernorm.weight"] = value
            state[f"chunks.{v}.decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
            state[f"decoder.layers.{v}.input_layernorm.weight"] = value
        state["chunks.0.embedding.word_embeddings.weight"] = torch.zeros(4, 2)
        return state

    full = merge({(0, 0): rank_state(0), (0, 1): rank_state(1)}, num_layers=4, tp_size=1,
                 pp_size=2, vp_size=2, gated=True, tied=False)
    for layer in range(4):
        assert full[f"decoder.layers.{layer}.input_layernorm.weight"][0] == layer
    assert not any("extra_state" in key or key.startswith("chunks") for key in full)


def test_transformer_engine_names_become_local_ones():
    assert canonical("decoder.layers.2.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.2.input_layernorm.weight"
    assert canonical("decoder.layers.0.mlp.linear_fc1.layer_norm_bias") == \
        "decoder.layers.0.pre_mlp_layernorm.bias"
    assert canonical("decoder.final_layernorm.weight") == "decoder.final_layernorm.weight"
