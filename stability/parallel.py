"""Process groups from torchrun's or SLURM's environment: gloo on CPU, NCCL on GPU.

World = tensor x pipeline x data. megatron-core's ``parallel_state`` owns the groups; this module
only finds out who we are, starts torch.distributed and tears it down.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass(frozen=True)
class Launch:
    """Who this process is, as told by the launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """torchrun | slurm | single."""


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0]


def detect_launch(env: dict[str, str] | None = None) -> Launch:
    """Read torchrun's variables, else SLURM's (srun / sbatch tasks), else a single process."""
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                      env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                      "torchrun")
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        # One port per job, so that two jobs sharing a node do not collide.
        port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                      int(env.get("SLURM_LOCALID", 0)),
                      env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
                      int(env.get("MASTER_PORT", port)), "slurm")
    return Launch(0, 1, 0, "127.0.0.1", 0, "single")


@dataclass(frozen=True)
class Topology:
    """This rank's place in the tensor x pipeline x data grid."""

    launch: Launch
    device: torch.device
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory's shared files."""
        return self.launch.rank == 0

    @property
    def layout(self) -> dict[str, int]:
        """The parallel layout (what a checkpoint must match to be loaded)."""
        return {"world_size": self.launch.world_size, "tensor": self.tp_size,
                "pipeline": self.pp_size, "data": self.dp_size}


def init(device: torch.device, tensor: int, pipeline: int,
         virtual_pipeline: int | None = None, launch: Launch | None = None) -> Topology:
    """Start torch.distributed and megatron's model-parallel groups."""
    launch = launch or detect_launch()
    if device.type == "cuda":
        torch.cuda.set_device(launch.local_rank)
        device = torch.device("cuda", launch.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if launch.world_size == 1:
            store = dist.HashStore()
        else:
            store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size,
                                  is_master=launch.rank == 0)
        dist.init_process_group(backend, store=store, rank=launch.rank,
                                world_size=launch.world_size)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
    )
    return Topology(
        launch=launch,
        device=device,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=tensor,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=pipeline,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )


def shutdown() -> None:
    """Destroy megatron's groups and the default process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def count_parameters(params: list[torch.nn.Parameter], topology: Topology) -> int:
    """Parameters of the whole model from one rank's shard: tensor-parallel shards summed,
    replicated ones (norms) counted once, a tied embedding's last-stage copy not again."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    local = sum(p.numel() for p in params if param_is_not_shared(p))
    replicated = sum(p.numel() for p in params if param_is_not_shared(p)
                     and not param_is_not_tensor_parallel_duplicate(p))
    count = local - replicated + replicated / topology.tp_size
    if topology.tp_size * topology.pp_size > 1:
        total = torch.tensor([count], dtype=torch.float64, device=topology.device)
        dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
        count = total.item()
    return int(round(count))
