"""Which attention / layer backend a run gets: by config, and by what is installed.

``model.attention_backend=auto`` picks Transformer Engine's layer spec when
``transformer_engine`` is importable and a GPU is visible, else flash-attn's kernel when
``flash_attn`` is, else torch's SDPA. Availability is checked with ``importlib.util.find_spec``:
nothing GPU-only is imported to answer, so the CPU path never loads those packages.
"""

from __future__ import annotations

import importlib.util

import torch

_PACKAGES = {"te": "transformer_engine", "flash": "flash_attn"}


def backend_available(backend: str) -> bool:
    """True when ``backend`` can run here (te and flash: a GPU and their package)."""
    package = _PACKAGES.get(backend)
    if package is None:
        return True
    return torch.cuda.is_available() and importlib.util.find_spec(package) is not None


def resolve_attention_backend(backend: str) -> str:
    """``model.attention_backend`` as it will run: auto -> te > flash > sdpa."""
    if backend != "auto":
        return backend
    for candidate in ("te", "flash"):
        if backend_available(candidate):
            return candidate
    return "sdpa"
