"""The GPU path: bf16 with fp32 masters on megatron-core's DDP and optimizer, no host syncs on
non-logging steps, Transformer Engine's spec, and parity with the fp32 CPU path.

Every test here needs CUDA and skips without it; the CPU suite covers the same loop on gloo.
``scripts/gpu-check`` runs the larger check (350m throughput and MFU) on one GPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import make_config
from parity import train

from stability import parallel
from stability.runtime import Runtime
from stability.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (the GPU path: bf16, megatron DDP)")

TINY = ["size=tiny", "recipe=llama2", "trainer.train_steps=20", "checkpoint.interval=0",
        "checkpoint.save_final=false", "logger.console=false", "trainer.device=cuda"]


@pytest.fixture
def gpu_process():
    topology = parallel.init(torch.device("cuda"), 1, 1)
    yield topology
    parallel.shutdown()


def test_bf16_keeps_fp32_masters_and_trains(tmp_path, gpu_process):
    cfg = make_config(*TINY, "trainer.precision=bf16", "optim.lr=3e-3")
    trainer = Trainer(cfg, tmp_path, [], runtime=Runtime.resolve(cfg), topology=gpu_process)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    masters = [p for part in trainer.engine.parts for p in part.get_parameters()]
    assert masters and {p.dtype for p in masters} == {torch.float32}
    losses = []
    for _ in range(10):
        trainer.train_step()
        losses.append(float(trainer.state.loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_no_host_sync_outside_logging_steps(tmp_path, gpu_process):
    from stability.train import default_callbacks

    cfg = make_config(*TINY, "trainer.log_interval=4", "monitors.interval=2",
                      "actions.on_spike=skip_step")
    callbacks = default_callbacks(cfg, tmp_path, True)
    trainer = Trainer(cfg, tmp_path, callbacks, runtime=Runtime.resolve(cfg),
                      topology=gpu_process)
    trainer.start(resume=False)
    trainer.train_step()  # warm-up: lazy initialisation (optimizer state, kernels)
    torch.cuda.synchronize()
    for _ in range(2):  # steps 2 and 3: neither is a logging step (log_interval=4)
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    trainer.train_step()
    trainer.finish_step()  # step 4 flushes: the one host transfer
    assert trainer.last_row["step"] == 4 and "mfu" in trainer.last_row


def test_distributed_optimizer_resumes_exactly(tmp_path):
    overrides = [*TINY, "optim.distributed=true", "optim.warmup_steps=2",
                 "optim.decay_steps=10", "checkpoint.interval=2"]
    whole = train(tmp_path / "whole", overrides)
    run = tmp_path / "resumed"
    train(run, [*overrides, "trainer.train_steps=4"], steps=4)
    resumed = train(run, overrides)
    for a, b in zip(whole, resumed, strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]
    assert "mfu" in whole[-1] and 0 < whole[-1]["mfu"] < 1


def test_fp32_gpu_matches_fp32_cpu_and_bf16_is_close(tmp_path):
    same = ["trainer.train_steps=10", "model.cpu_initialization=true", "optim.lr=3e-3"]
    cpu = train(tmp_path / "cpu", [*same, "trainer.device=cpu"])
    fp32 = train(tmp_path / "fp32", [*same, "trainer.device=cuda", "trainer.precision=fp32",
                                     "model.attention_backend=sdpa"])
    bf16 = train(tmp_path / "bf16", [*same, "trainer.device=cuda", "trainer.precision=bf16"])
    for a, b, c in zip(cpu, fp32, bf16, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
        assert c["loss"] == pytest.approx(a["loss"], abs=5e-2), a["step"]


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                    reason="needs transformer-engine")
@pytest.mark.parametrize("norm_position", ["pre", "post", "sandwich"])
def test_transformer_engine_spec_trains_every_norm_position(tmp_path, gpu_process, norm_position):
    cfg = make_config(*TINY, "model.attention_backend=te", f"model.norm_position={norm_position}",
                      "model.qk_layernorm=true", "optim.lr=3e-3")
    trainer = Trainer(cfg, tmp_path, [], runtime=Runtime.resolve(cfg), topology=gpu_process)
    names = [type(m).__name__ for m in trainer.model.modules()]
    assert "TEDotProductAttention" in names
    assert ("TELayerNormColumnParallelLinear" in names) == (norm_position != "post")
    losses = []
    for _ in range(8):
        trainer.train_step()
        losses.append(float(trainer.state.loss))
    assert losses[-1] < losses[0]
