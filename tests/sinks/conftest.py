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
def make_trainer(tiny_config):
    """A stand-in for the Trainer with what the W&B sink reads: run_dir, step, cfg, topology."""
    def make(run_dir: Path, step: int = 0, is_main: bool = True) -> SimpleNamespace:
        return SimpleNamespace(run_dir=run_dir, step=step, cfg=tiny_config,
                               topology=SimpleNamespace(is_main=is_main))

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
