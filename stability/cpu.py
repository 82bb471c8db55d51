"""The three adjustments that let megatron-core's local model run without CUDA.

megatron-core assumes CUDA in these places (measured in the project notes, "megatron-core on CPU"):

1. RoPE, the local attention and pipeline p2p allocate on ``torch.cuda.current_device()``;
2. the tensor-parallel RNG tracker seeds and forks CUDA generators;
3. the default causal attention mask is built on "cuda" (we always pass our own mask);
4. the pipeline schedules count tokens in ``torch.zeros(..., device="cuda")`` and p2p calls
   ``torch.cuda.synchronize()``; a tied embedding is moved with ``.cuda()`` before its first- and
   last-stage copies are all-reduced.

``apply()`` fixes 1, 2 and 4 (3 needs no patch). ``stability.runtime.Runtime.apply`` calls it
for CPU runs only, also on a machine that has a GPU (``trainer.device=cpu``), so GPU runs use
megatron-core unchanged. On a CPU run the CPU is the device: "cuda" placements land there, and
a synchronisation has nothing to wait for.
"""

from __future__ import annotations

import contextlib
import types

import torch
from megatron.core.pipeline_parallel import schedules as mcore_schedules
from megatron.core.tensor_parallel import random as mcore_random


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron's RNG tracker with CPU generator states in place of CUDA ones.

    Tensor-parallel ranks get their own dropout streams exactly as on GPU, so dropout > 0 stays
    correct under tensor parallelism.
    """

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG state {name!r} (seed {seed}) already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise ValueError(f"RNG state {name!r} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def apply() -> None:
    """Patch what megatron-core needs to run on CPU (idempotent; for CPU runs only)."""
    torch.cuda.current_device = lambda: "cpu"  # RoPE buffers and attention scratch go to CPU
    torch.cuda.synchronize = lambda device=None: None  # p2p's guard for batched send/recv
    torch.Tensor.cuda = _stay_on_cpu  # the tied embedding's first/last-stage copy
    if not isinstance(mcore_schedules.torch, _TorchOnCpu):
        mcore_schedules.torch = _TorchOnCpu()  # total_num_tokens = torch.zeros(device="cuda")
    if not isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def seed_model_parallel_rng(seed: int, tp_rank: int, device_type: str) -> None:
    """megatron's ``model_parallel_cuda_manual_seed`` for either device."""
    if device_type == "cuda":
        mcore_random.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
        return
    tracker = mcore_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)


def _stay_on_cpu(self: torch.Tensor, device=None, non_blocking: bool = False, **kwargs):
    return self


class _TorchOnCpu(types.SimpleNamespace):
    """``torch`` as megatron's pipeline schedules see it: factories asked for "cuda" give CPU
    tensors. Only the schedules' module global is replaced; everything else is torch itself."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*size, device=None, **kwargs) -> torch.Tensor:
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return torch.zeros(*size, device=device, **kwargs)
