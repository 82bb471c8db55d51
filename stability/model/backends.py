"""Which attention / layer backend a run gets: by config, and by what is installed.

``model.attention_backend=auto`` picks Transformer Engine's layer spec when
``transformer_engine`` is importable and the run is on a GPU, else flash-attn's kernel when
``flash_attn`` is, else torch's SDPA. Availability is checked with ``importlib.util.find_spec``:
nothing GPU-only is imported to answer, so the CPU path never loads those packages. The device
comes from ``stability.runtime.Runtime`` (decided once).
"""

from __future__ import annotations

import importlib.util

_PACKAGES = {"te": "transformer_engine", "flash": "flash_attn"}


def backend_available(backend: str, device_type: str) -> bool:
    """True when ``backend`` can run on ``device_type`` (te and flash: cuda and their
    package)."""
    package = _PACKAGES.get(backend)
    if package is None:
        return True
    return device_type == "cuda" and importlib.util.find_spec(package) is not None


def resolve_attention_backend(backend: str, device_type: str) -> str:
    """``model.attention_backend`` as it will run: auto -> te > flash > sdpa."""
    if backend != "auto":
        return backend
    for candidate in ("te", "flash"):
        if backend_available(candidate, device_type):
            return candidate
    return "sdpa"
