"""The three adjustments that let megatron-core's local model run without CUDA.

megatron-core assumes CUDA in three places (measured in the project notes, "megatron-core on CPU"):

1. RoPE and the local attention allocate on ``torch.cuda.current_device()``;
2. the tensor-parallel RNG tracker seeds and forks CUDA generators;
3. the default causal attention mask is built on "cuda" (we always pass our own mask).

``apply()`` fixes 1 and 2 and is a no-op when CUDA is available, so GPU runs use megatron-core
unchanged.
"""

from __future__ import annotations

import contextlib

import torch
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
    """Patch what megatron-core needs to run on CPU; does nothing when CUDA is available."""
    if torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"  # RoPE buffers and attention scratch go to CPU
    if not isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def seed_model_parallel_rng(seed: int, tp_rank: int) -> None:
    """megatron's ``model_parallel_cuda_manual_seed`` for either device."""
    if torch.cuda.is_available():
        mcore_random.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
        return
    tracker = mcore_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
