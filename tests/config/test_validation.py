"""Bad config values are refused before any work starts: one test per rule."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import REPO, make_config

from stability.config import validate
from stability.errors import ConfigError
from stability.runtime import Runtime

RULES = [
    # (overrides, key named in the error, a word of what is allowed)
    (["model.norm_type=batchnorm"], "model.norm_type", "layernorm, rmsnorm"),
    (["model.norm_position=middle"], "model.norm_position", "pre, post, sandwich"),
    (["model.position_embedding=alibi"], "model.position_embedding", "learned, rope"),
    (["model.activation=relu"], "model.activation", "gelu, swiglu"),
    (["model.attention_backend=xformers"], "model.attention_backend", "sdpa"),
    (["model.hidden_size=65"], "model.hidden_size", "multiple of model.num_attention_heads=4"),
    (["model.num_query_groups=3"], "model.num_attention_heads", "model.num_query_groups=3"),
    (["parallel.tensor=8"], "model.num_attention_heads", "parallel.tensor=8"),
    (["parallel.pipeline=3"], "model.num_layers", "parallel.pipeline=3"),
    (["optim.lr=-0.001"], "optim.lr", "> 0"),
    (["optim.lr=1e-4", "optim.min_lr=1e-3"], "optim.min_lr", "at most optim.lr"),
    (["trainer.train_steps=40", "optim.warmup_steps=50"], "optim.warmup_steps",
     "fewer than trainer.train_steps=40"),
    (["optim.eps=0"], "optim.eps", "> 0"),
    (["optim.beta2=1.0"], "optim.beta2", "[0, 1)"),
    (["optim.clip_grad=-1"], "optim.clip_grad", ">= 0"),
    (["optim.decay_style=step"], "optim.decay_style", "cosine"),
    (["loss.z_loss=-1e-4"], "loss.z_loss", ">= 0"),
    (["model.init_std=0"], "model.init_std", "> 0"),
    (["model.hidden_dropout=1.5"], "model.hidden_dropout", "[0, 1)"),
    (["trainer.global_batch_size=12", "trainer.micro_batch_size=8"],
     "trainer.global_batch_size", "multiple of trainer.micro_batch_size"),
    (["trainer.device=tpu"], "trainer.device", "auto, cpu, cuda"),
    (["data.seq_length=0"], "data.seq_length", "> 0"),
    (["logger.wandb.mode=cloud"], "logger.wandb.mode", "offline, online, disabled"),
    (["checkpoint.resume=latest"], "checkpoint.resume", "auto, never"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=3"], "model.num_layers",
     "parallel.pipeline * virtual_pipeline"),
    (["trainer.precision=fp16"], "trainer.precision", "auto, fp32, bf16"),
    (["logger.wandb.max_alerts=-2"], "logger.wandb.max_alerts", ">= 0"),
    (["logger.wandb.table_interval_steps=0"], "logger.wandb.table_interval_steps", "> 0"),
    (["data.name=parquet"], "data.name", "sample, indexed"),
    (["data.name=indexed"], "data.path", "a .bin/.idx prefix"),
    (["data.split=half"], "data.split", "one to three weights"),
    (["actions.on_spike=panic"], "actions.on_spike", "log, alert, skip_step, rollback, stop"),
    (["actions.on_spike=rollback", "checkpoint.interval=0"], "checkpoint.interval",
     "> 0 when an action is rollback"),
    (["fault.kind=meteor"], "fault.kind", "lr_spike, bad_batch, nan"),
    (["monitors.update_rows_fraction=0"], "monitors.update_rows_fraction", "(0, 1]"),
]

# What the machine allows, decided once by the runtime (here: a machine without CUDA).
RUNTIME_RULES = [
    (["trainer.device=cuda"], "trainer.device", "no CUDA device visible"),
    (["trainer.precision=bf16", "trainer.device=cpu"], "trainer.precision", "needs a GPU"),
    (["trainer.precision=bf16"], "trainer.precision", "needs a GPU"),
    (["optim.distributed=true", "trainer.device=cpu"], "optim.distributed", "needs a GPU"),
    (["model.attention_backend=te", "trainer.device=cpu"], "model.attention_backend",
     "transformer-engine"),
    (["model.attention_backend=flash", "trainer.device=cpu"], "model.attention_backend",
     "flash-attn"),
]


@pytest.mark.parametrize(("overrides", "key", "allowed"), RULES,
                         ids=[" ".join(r[0]) for r in RULES])
def test_rule(overrides, key, allowed):
    cfg = make_config(*overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key
    message = str(err.value)
    assert key in message and allowed in message
    assert repr(err.value.value) in message
    if overrides[-1].startswith(key + "="):  # the bad value is the one we passed
        assert err.value.value == _parse(overrides[-1].split("=", 1)[1])


@pytest.mark.parametrize(("overrides", "key", "allowed"), RUNTIME_RULES,
                         ids=[" ".join(r[0]) for r in RUNTIME_RULES])
def test_runtime_rule(overrides, key, allowed):
    cfg = make_config(*overrides)
    validate(cfg)  # a valid config: it is the machine that cannot run it
    with pytest.raises(ConfigError) as err:
        Runtime.resolve(cfg, cuda_available=False)
    assert err.value.key == key and allowed in str(err.value)


def test_runtime_is_decided_once_from_the_config():
    cpu = Runtime.resolve(make_config(), cuda_available=False)
    assert (cpu.device_type, cpu.precision, cpu.attention_backend) == ("cpu", "fp32", "sdpa")
    assert cpu.cpu_initialization and not cpu.bf16
    gpu = Runtime.resolve(make_config(), cuda_available=True)
    assert (gpu.device_type, gpu.precision) == ("cuda", "bf16")
    assert gpu.params_dtype == torch.bfloat16 and not gpu.cpu_initialization
    # trainer.device=cpu on a machine with a GPU is a CPU run, with its CPU initialisation.
    forced = Runtime.resolve(make_config("trainer.device=cpu"), cuda_available=True)
    assert (forced.device_type, forced.precision, forced.cpu_initialization) == \
        ("cpu", "fp32", True)


def test_unknown_keys_are_refused_like_any_bad_key(tmp_path):
    for override, key in (("+optim.nonexistent=1", "optim.nonexistent"),
                          ("+bogus=2", "bogus"), ("+logger.wandb.colour=red",
                                                  "logger.wandb.colour")):
        with pytest.raises(ConfigError) as err:
            make_config(override)
        assert err.value.key == key and "a key of the schema" in str(err.value)
    # detectors.params is an open mapping: any detector's keyword arguments
    assert make_config("+detectors.params.loss_spike.window=64").detectors.params == {
        "loss_spike": {"window": 64}}
    proc = subprocess.run([sys.executable, "-m", "stability.train", "+optim.nonexistent=1",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip().splitlines()[0]] and "optim.nonexistent=1" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _parse(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def test_world_size_must_fit_the_model_parallel_grid():
    cfg = make_config("parallel.tensor=2")
    with pytest.raises(ConfigError, match="world size"):
        validate(cfg, world_size=3)


def test_virtual_pipeline_needs_micro_batches_in_groups_of_the_pipeline():
    cfg = make_config("model.num_layers=4", "parallel.pipeline=2", "parallel.virtual_pipeline=2",
                      "trainer.micro_batch_size=8")  # one micro batch per step: not a group of 2
    with pytest.raises(ConfigError, match=r"data-parallel size \* parallel.pipeline") as err:
        validate(cfg, world_size=2)
    assert err.value.key == "trainer.global_batch_size"
    validate(make_config("model.num_layers=4", "parallel.pipeline=2",
                         "parallel.virtual_pipeline=2", "trainer.micro_batch_size=4"),
             world_size=2)


def test_defaults_and_recipes_are_valid():
    for recipe in ("gpt", "llama2"):
        for size in ("tiny", "study", "small", "125m", "350m", "1.3b", "7b", "13b", "70b",
                     "gpt175b", "llama172b"):
            overrides = [f"recipe={recipe}", f"size={size}"]
            if size not in ("tiny", "study", "small"):  # the published warmup needs a long run
                overrides.append("trainer.train_steps=10000")
            validate(make_config(*overrides))


def test_command_line_exits_2_with_one_line_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "stability.train", "model.norm_type=batchnorm",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["config error: model.norm_type='batchnorm' is not allowed: "
                     "one of layernorm, rmsnorm"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
