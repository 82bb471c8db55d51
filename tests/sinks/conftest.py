import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # wandb_records


@pytest.fixture(scope="session")
def tiny_config():
    from stability.config import compose

    return compose("size=tiny")


@pytest.fixture(scope="session")
def make_state():
    """A stand-in for the loop's StepState with what a sink reads: the step."""
    def make(step: int = 0) -> SimpleNamespace:
        return SimpleNamespace(step=step)

    return make


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """W&B offline and silent, its own files in a temporary directory, no key, no network."""
    root = tmp_path_factory.mktemp("wandb_env")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DIR", str(root))
        mp.setenv("WANDB_CONFIG_DIR", str(root / "config"))
        mp.setenv("WANDB_CACHE_DIR", str(root / "cache"))
        mp.setenv("WANDB_DATA_DIR", str(root / "data"))
        mp.delenv("WANDB_API_KEY", raising=False)
        yield root
