"""Bad config values are refused before any work starts: one test per rule."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import REPO, make_config

from stability.config import validate
from stability.errors import ConfigError

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
    (["trainer.precision=bf16", "trainer.device=cpu"], "trainer.precision", "needs a GPU"),
    (["trainer.precision=fp16"], "trainer.precision", "auto, fp32, bf16"),
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the rule is about machines without CUDA")
def test_cuda_device_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match="no CUDA device visible"):
        validate(make_config("trainer.device=cuda"))


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
        for size in ("tiny", "small", "125m", "350m", "1.3b", "7b", "13b", "70b", "gpt175b",
                     "llama172b"):
            overrides = [f"recipe={recipe}", f"size={size}"]
            if size not in ("tiny", "small"):  # the recipe's published warmup needs a long run
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
