"""A rank's virtual pipeline stages (model chunks) seen as one model.

With ``parallel.virtual_pipeline=V`` a rank holds V chunks of non-adjacent layers (megatron's
interleaved schedule: rank r of P holds layers of stages r, r+P, ...). The schedule takes the
list; everything else (optimizer groups, monitors, checkpoints, parameter counts) takes this
module: ``decoder.layers`` lists the rank's layers in chunk order (each knows its global
``layer_number``), the embedding is the first chunk's, and the layers' parameters are named
``decoder.layers.<i>.`` as in a single chunk (registered first, so ``named_parameters`` keeps
those names).
"""

from __future__ import annotations

import torch


class _Decoder(torch.nn.Module):
    def __init__(self, layers: list[torch.nn.Module]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)


class ModelChunks(torch.nn.Module):
    """The chunks of one rank, in virtual-stage order."""

    def __init__(self, chunks: list[torch.nn.Module]) -> None:
        super().__init__()
        self.decoder = _Decoder([layer for chunk in chunks for layer in chunk.decoder.layers])
        self.chunks = torch.nn.ModuleList(chunks)

    @property
    def config(self):
        return self.chunks[0].config

    @property
    def pre_process(self) -> bool:
        return self.chunks[0].pre_process

    @property
    def embedding(self) -> torch.nn.Module:
        return self.chunks[0].embedding

    def forward(self, *args, **kwargs):
        raise RuntimeError("a virtual pipeline runs chunk by chunk (megatron's schedule)")
