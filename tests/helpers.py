"""Shared helpers for tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from stability.config import Config
from stability.config import compose as make_config

REPO = Path(__file__).resolve().parent.parent

__all__ = ["REPO", "build_model_for", "cpu_runtime", "make_config", "make_trainer"]


def cpu_runtime(cfg: Config):
    """The runtime of ``cfg`` on the CPU (also on a machine with a GPU)."""
    from stability.runtime import Runtime

    trainer = dataclasses.replace(cfg.trainer, device="cpu")
    return Runtime.resolve(dataclasses.replace(cfg, trainer=trainer), cuda_available=False)


def build_model_for(cfg: Config, vocab_size: int, output_in_loss: bool = False):
    """This process's model of ``cfg`` on the CPU (megatron's parallel state must exist); it
    returns logits unless ``output_in_loss`` (as the trainer builds it on the CPU)."""
    from stability.model.build import build_model

    p = cfg.parallel
    return build_model(cfg.model, cpu_runtime(cfg), vocab_size=vocab_size,
                       seq_length=cfg.data.seq_length, seed=cfg.trainer.seed, tensor=p.tensor,
                       pipeline=p.pipeline, virtual_pipeline=p.virtual_pipeline,
                       output_in_loss=output_in_loss)


def make_trainer(cfg: Config, run_dir: Path, callbacks: list, topology):
    """A Trainer of ``cfg`` on the CPU in an existing process group (``single_process``)."""
    from stability.trainer import Trainer

    return Trainer(cfg, run_dir, callbacks, runtime=cpu_runtime(cfg), topology=topology)
