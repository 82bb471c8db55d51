"""What the first GPU run would have tripped on, shown on the CPU: RNG states loaded where
``set_rng_state`` needs them, no host sync between flushes, an all-bf16 model, a CPU run on a
machine that has a GPU, update ratios from the fp32 masters. The GPU itself: tests/train/
test_gpu.py and scripts/gpu-check."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, cpu_runtime, make_config, make_trainer

from stability.checkpoint import Checkpointer, rng_state, set_rng_state
from stability.model.build import build_model, causal_mask
from stability.runfiles import read_jsonl
from stability.runtime import Runtime
from stability.train import default_callbacks
from stability.trainer import seed_everything
from stability.watch.monitors import _master


def test_rng_states_load_to_the_host_whatever_the_runs_device(tmp_path):
    # Loading with map_location=<the run's device> put the saved RNG states on the GPU, and
    # set_rng_state refuses anything but a CPU ByteTensor: every GPU resume crashed. The
    # checkpointer's device ("meta" here, "cuda" on a GPU) is for its collectives only.
    checkpointer = Checkpointer(tmp_path, keep_last=1, rank=0, world_size=1,
                                device=torch.device("meta"), layout={})
    torch.manual_seed(7)
    checkpointer.save({"rng": rng_state("cpu")}, 1, "config: 1\n")
    expected = torch.rand(3)
    _, state = checkpointer.load()
    assert state["rng"]["torch"].device.type == "cpu"
    set_rng_state(state["rng"], "cpu")
    assert torch.equal(torch.rand(3), expected)


def test_no_host_sync_between_flushes(tmp_path, single_process, monkeypatch):
    # The default GPU run: monitors (a full pass at step 2), the skip guard (on_nonfinite=stop
    # and on_spike=skip_step), flushes every 4 steps: steps 2 and 3 must not wait for the device.
    cfg = make_config("size=tiny", "trainer.log_interval=4", "monitors.interval=2",
                      "actions.on_spike=skip_step", "checkpoint.interval=0",
                      "checkpoint.save_final=false", "logger.console=false")
    trainer = make_trainer(cfg, tmp_path, default_callbacks(cfg, tmp_path, True),
                           single_process)
    trainer.start(resume=False)
    trainer.train_step()
    trainer.finish_step()

    def sync(*args, **kwargs):
        raise AssertionError("a host sync between flushes")

    with monkeypatch.context() as patched:
        for name in ("item", "tolist", "__bool__", "__index__", "__int__", "__float__"):
            patched.setattr(torch.Tensor, name, sync)
        for _ in range(2):
            trainer.train_step()
            assert trainer.finish_step() is None
    trainer.train_step()
    trainer.finish_step()  # step 4 flushes: the one transfer
    assert trainer.last_row["step"] == 4


@pytest.mark.parametrize("recipe", ["gpt", "llama2"])
def test_a_bf16_model_has_only_bf16_parameters(single_process, recipe):
    cfg = make_config(f"recipe={recipe}", "model.qk_layernorm=true",
                      "model.embedding_layernorm=true")
    runtime = Runtime(device_type="cuda", precision="bf16", attention_backend="sdpa",
                      cpu_initialization=True)  # built on the CPU, as before moving to a GPU
    model = build_model(cfg.model, runtime, vocab_size=1000, seq_length=32, seed=1)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert set(dtypes.values()) == {torch.bfloat16}, {n: d for n, d in dtypes.items()
                                                      if d != torch.bfloat16}


def test_a_cpu_run_on_a_machine_with_a_gpu(tmp_path):
    # trainer.device=cpu where CUDA is visible: the CPU adjustments must apply (they used to
    # decide by torch.cuda.is_available(), and megatron's RoPE then asked for a CUDA device).
    run_dir = tmp_path / "run"
    code = ("import sys, torch; torch.cuda.is_available = lambda: True; "
            "from stability.train import _hydra_main; sys.argv[1:] = " + repr([
                "trainer.device=cpu", "size=tiny", "trainer.train_steps=3",
                "trainer.threads=1", "logger.console=false", f"hydra.run.dir={run_dir}"])
            + "; _hydra_main()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl")] == [1, 2, 3]


def test_update_ratios_read_the_fp32_master_where_it_is_whole():
    weight = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    weight.main_param = torch.ones(4, 4)
    assert _master(weight) is weight.main_param
    # An update of 1e-4 relative is below one bf16 ulp (2^-7 at 1.0): the bf16 weight does not
    # move, the master does.
    before = _master(weight).clone()
    weight.main_param += 1e-4
    weight.data.copy_(weight.main_param)
    assert torch.equal(weight.detach().float(), before)
    assert (_master(weight) - before).norm() > 0
    sharded = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    sharded.main_param = torch.ones(8)  # the distributed optimizer's shard: not whole
    assert _master(sharded) is sharded


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["llama2", "gpt"])
def test_fused_kernels_compute_what_the_unfused_model_computes(single_process, recipe):
    # model.fusions (on by default on GPU): megatron's torch.compile-fused bias+SwiGLU/GELU
    # and bias+dropout+add. Compiled here for the CPU (inductor), so the first GPU run does
    # not meet them for the first time.
    cfg = make_config(f"recipe={recipe}", "size=tiny")
    results = []
    for fused in (False, True):
        runtime = dataclasses.replace(cpu_runtime(cfg), fusions=fused)
        seed_everything(1, 0, "cpu")  # the same initial weights
        model = build_model(cfg.model, runtime, vocab_size=1000, seq_length=64, seed=1)
        tokens = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
        logits = model(input_ids=tokens, position_ids=torch.arange(64).expand(2, 64),
                       attention_mask=causal_mask(64, torch.device("cpu")))
        logits.float().square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    mlp = model.decoder.layers[0].mlp
    assert mlp.config.bias_activation_fusion and mlp.config.bias_dropout_fusion


def test_the_gpu_check_stops_at_once_without_its_packages(tmp_path):
    bare = tmp_path / "bare"  # a Python with nothing installed, no .whl/ to install from
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check"), "--smoke"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=dict(os.environ, PYTHON=str(bare / "bin" / "python")))
    assert proc.returncode == 1
    assert "missing Python packages: torch megatron.core hydra" in proc.stderr
    assert "scripts/gpu-wheels" in proc.stderr
