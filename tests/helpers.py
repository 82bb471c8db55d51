"""Shared helpers for tests: compose configs the way the command line does."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stability.config import Config, register_configs

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


def make_config(*overrides: str) -> Config:
    """The typed config that ``python -m stability.train OVERRIDES`` would run."""
    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        node = compose("config", overrides=list(overrides))
    return OmegaConf.to_object(node)
