import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Tests run on 2 cores next to each other's subprocesses: keep each process on one thread
# unless a test says otherwise, so timings and results do not depend on the machine's load.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def single_process():
    """torch.distributed (gloo, world 1) and megatron's parallel state, torn down afterwards."""
    import torch

    from stability import cpu, parallel

    cpu.apply()
    topology = parallel.init(torch.device("cpu"), 1, 1)
    cpu.seed_model_parallel_rng(1234, 0, "cpu")
    yield topology
    parallel.shutdown()
