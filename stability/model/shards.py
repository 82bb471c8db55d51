"""The whole model's state dict from a checkpoint's rank files, and a rank's shard of it.

A checkpoint (``stability/checkpoint.py``) holds one ``rank_R.pt`` per process, each with that
rank's ``"model"``: its pipeline stage (or, with virtual stages, its chunks of layers) and its
tensor-parallel shard of every matrix, under megatron-core's names. This module turns them into
one **full** state dict, offline (CPU, no process group), and back:

- names as a one-process model (``parallel.tensor=1 parallel.pipeline=1``) has them, layers
  numbered globally (``decoder.layers.<0..L-1>.``); Transformer Engine's fused norm names
  (``linear_qkv.layer_norm_weight``) become the local spec's (``input_layernorm.weight``);
  ``_extra_state`` entries and a tied output layer's copy of the embedding are dropped;
- the vocabulary as the run padded it (``model.vocab_size_divisible_by`` x TP).

How each parameter is split across tensor-parallel ranks (megatron-core's local layers):

==========================================  ====================================================
``embedding.word_embeddings.weight``        rows (vocabulary), ``VocabParallelEmbedding``
``output_layer.weight``                     rows (vocabulary), ``ColumnParallelLinear``
``linear_qkv.weight`` / ``.bias``           rows: [query groups x (q heads, k, v) x head_dim],
                                            so each rank holds whole query groups
``linear_fc1.weight`` / ``.bias``           rows; gated (SwiGLU) ``[gate; up]``: each rank holds
                                            ``[gate_r; up_r]``
``linear_proj.weight``, ``linear_fc2.weight``  columns (``RowParallelLinear``; biases replicated)
everything else                             replicated: norms, position embeddings, qk norms
==========================================  ====================================================

Ranks follow megatron-core's default order (``tp-cp-ep-dp-pp``: tensor fastest, then data,
then pipeline); layers are split evenly over stages, and with virtual stages rank p's chunk v
holds the layers of stage ``v * P + p`` (the interleaved schedule).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")

_TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
"""Transformer Engine's fused input norms, under the local spec's names."""


def split_dim(key: str, gated: bool) -> int | str | None:
    """How ``key`` (a full-model name) is split over tensor-parallel ranks: a dimension, "glu"
    (rows of ``[gate; up]``, each half split on its own), or None (replicated)."""
    if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return 0
    name = ".".join(key.split(".")[-2:])
    if name in ("linear_qkv.weight", "linear_qkv.bias"):
        return 0
    if name in ("linear_fc1.weight", "linear_fc1.bias"):
        return "glu" if gated else 0
    if name in ("linear_proj.weight", "linear_fc2.weight"):
        return 1
    return None


def tp_slice(full: torch.Tensor, rule: int | str | None, tp_rank: int,
             tp_size: int) -> torch.Tensor:
    """This tensor-parallel rank's part of the full tensor ``full`` split by ``rule``."""
    if rule is None or tp_size == 1:
        return full
    if rule == "glu":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
    return full.chunk(tp_size, dim=rule)[tp_rank]


def tp_merge(parts: list[torch.Tensor], rule: int | str | None) -> torch.Tensor:
    """The full tensor from the tensor-parallel ranks' ``parts`` (in rank order)."""
    if rule is None or len(parts) == 1:
        return parts[0]
    if rule == "glu":
        halves = [part.chunk(2, dim=0) for part in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(parts, dim=rule)


def layer_offset(num_layers: int, pp_rank: int, pp_size: int, vp_stage: int | None = None,
                 vp_size: int | None = None) -> int:
    """Global index of the first layer of a pipeline rank's stage (or virtual chunk), for
    layers split evenly as megatron-core splits them without an uneven layout."""
    if vp_size is None:
        return pp_rank * (num_layers // pp_size)
    per_chunk = num_layers // (pp_size * vp_size)
    return (vp_stage or 0) * (num_layers // vp_size) + pp_rank * per_chunk


def global_rank(tp_rank: int, pp_rank: int, tp_size: int, dp_size: int, dp_rank: int = 0) -> int:
    """The global rank of a (tensor, pipeline, data) position in megatron-core's default order."""
    return tp_rank + tp_size * (dp_rank + dp_size * pp_rank)


def canonical(key: str) -> str:
    """``key`` under the local spec's names (Transformer Engine's fused norms renamed)."""
    match = _LAYER.match(key)
    if match and match.group(2) in _TE_NAMES:
        return f"decoder.layers.{match.group(1)}.{_TE_NAMES[match.group(2)]}"
    return key


def chunk_states(model_state: dict[str, Any], vp_size: int | None) -> list[dict[str, Any]]:
    """A rank's ``"model"`` state as one state dict per model chunk (``ModelChunks`` saves
    chunk v under ``chunks.<v>.``, and its layers again under ``decoder.layers.``)."""
    if vp_size is None:
        return [model_state]
    chunks: list[dict[str, Any]] = [{} for _ in range(vp_size)]
    for key, value in model_state.items():
        match = re.match(r"^chunks\.(\d+)\.(.*)$", key)
        if match:
            chunks[int(match.group(1))][match.group(2)] = value
    return chunks


def renumber(state: dict[str, Any], offset: int) -> dict[str, torch.Tensor]:
    """A chunk's tensors with global layer numbers and canonical names (no ``_extra_state``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("_extra_state") or not isinstance(value, torch.Tensor):
            continue
        match = _LAYER.match(key)
        if match:
            key = f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}"
        out[canonical(key)] = value
    return out


def merge(rank_states: dict[tuple[int, int], dict[str, Any]], *, num_layers: int,
          tp_size: int, pp_size: int, vp_size: int | None, gated: bool,
          tied: bool) -> dict[str, torch.Tensor]:
    """The full state dict from the ``"model"`` states of one data-parallel replica, keyed by
    (tensor rank, pipeline rank)."""
    per_tp: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
    for (tp_rank, pp_rank), model_state in rank_states.items():
        for vp_stage, chunk in enumerate(chunk_states(model_state, vp_size)):
            offset = layer_offset(num_layers, pp_rank, pp_size,
                                  vp_stage if vp_size else None, vp_size)
            per_tp[tp_rank].update(renumber(chunk, offset))
    full: dict[str, torch.Tensor] = {}
    for key in per_tp[0]:
        if tied and key == "output_layer.weight":
            continue  # the last stage's copy of the (tied) embedding
        missing = [r for r in range(tp_size) if key not in per_tp[r]]
        if missing:
            raise ValueError(f"{key} is missing from tensor-parallel rank(s) {missing}")
        full[key] = tp_merge([per_tp[r][key] for r in range(tp_size)], split_dim(key, gated))
    return full


def read_checkpoint_model(path: Path, num_layers: int, gated: bool,
                          tied: bool, vp_size: int | None) -> dict[str, torch.Tensor]:
    """The full state dict of the checkpoint folder ``path`` (``checkpoints/step_N``), merged
    from the rank files of data-parallel replica 0, read memory-mapped and weights-only."""
    layout = json.loads((path / "meta.json").read_text())["layout"]
    tp, pp, dp = layout["tensor"], layout["pipeline"], layout["data"]
    states = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            file = path / f"rank_{global_rank(tp_rank, pp_rank, tp, dp):05d}.pt"
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            states[(tp_rank, pp_rank)] = state["model"]
    return merge(states, num_layers=num_layers, tp_size=tp, pp_size=pp, vp_size=vp_size,
                 gated=gated, tied=tied)


def load_into(chunk: torch.nn.Module, full: dict[str, torch.Tensor], *, tp_rank: int,
              tp_size: int, gated: bool) -> None:
    """Copy this rank's shard of the full state dict ``full`` into the model chunk ``chunk``.

    Every tensor of the chunk must be found with the shape this rank holds; a tied output
    layer on a last stage without the embedding takes the embedding's rows.

    Raises:
        ValueError: A tensor of the chunk is missing from ``full`` or has another shape.
    """
    local: dict[str, torch.Tensor] = {}
    for key, current in chunk.state_dict().items():
        if key.endswith("_extra_state") or not isinstance(current, torch.Tensor):
            continue
        name = key
        match = _LAYER.match(key)
        if match:  # the layer's global number is its own (1-based) layer_number
            number = chunk.decoder.layers[int(match.group(1))].layer_number - 1
            name = f"decoder.layers.{number}.{match.group(2)}"
        name = canonical(name)
        if name == "output_layer.weight" and name not in full:
            name = "embedding.word_embeddings.weight"  # tied embedding, last stage's copy
        if name not in full:
            raise ValueError(f"{name} is missing from the weights to load")
        tensor = tp_slice(full[name], split_dim(name, gated), tp_rank, tp_size)
        if tuple(tensor.shape) != tuple(current.shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} for tensor-parallel rank "
                             f"{tp_rank}, the model has {tuple(current.shape)}")
        local[key] = tensor
    missing, unexpected = chunk.load_state_dict(local, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
