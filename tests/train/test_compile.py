"""trainer.compile: the same run, the same checkpoints, with the model compiled (inductor)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_config, make_trainer

from stability.errors import ConfigError
from stability.train import default_callbacks

STEPS = 4
TOLERANCE = 1e-5
"""Max |loss difference| allowed per step: inductor fuses the element-wise work between the
matmuls (same math, another rounding order); measured 5e-7 over 40 steps at size=small."""


def run(cfg, run_dir, topology) -> tuple[list[float], dict]:
    trainer = make_trainer(cfg, run_dir, default_callbacks(cfg, run_dir, True), topology)
    trainer.start(resume=False)
    losses = []
    for _ in range(STEPS):
        trainer.train_step()
        trainer.finish_step()
        losses.append(float(trainer.state.loss))
    return losses, trainer


def test_a_compiled_run_has_the_losses_and_checkpoint_keys_of_an_eager_one(tmp_path,
                                                                          single_process):
    overrides = ("model.num_layers=1", "trainer.device=cpu", f"trainer.train_steps={STEPS}",
                 "checkpoint.interval=0",
                 "checkpoint.save_final=false", "logger.console=false")
    eager_losses, eager = run(make_config(*overrides), tmp_path / "eager", single_process)
    compiled_losses, compiled = run(make_config(*overrides, "trainer.compile=true"),
                                    tmp_path / "compiled", single_process)
    assert max(abs(a - b) for a, b in zip(eager_losses, compiled_losses, strict=True)) \
        <= TOLERANCE
    # The monitors' hooks run inside the compiled graph: the same statistics are recorded.
    assert sorted(eager.last_row) == sorted(compiled.last_row)
    assert compiled.last_row["attn_logit_max"] == pytest.approx(eager.last_row["attn_logit_max"],
                                                                rel=1e-4)

    saved = compiled.state_dict()
    assert list(saved["model"]) == list(eager.state_dict()["model"])
    assert not any("_orig_mod" in key for key in saved["model"])
    # An eager run's checkpoint loads into the compiled model, which then trains on from it.
    compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
    for a, b in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    eager.train_step()
    compiled.train_step()
    assert abs(float(eager.state.loss) - float(compiled.state.loss)) <= TOLERANCE


def test_compile_is_refused_under_tensor_or_pipeline_parallelism():
    for layout in ("parallel.tensor=2", "parallel.pipeline=2"):
        cfg = make_config("trainer.compile=true", layout)
        with pytest.raises(ConfigError, match="trainer.compile"):
            cfg.validate(world_size=2)
