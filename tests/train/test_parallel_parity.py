"""Tensor parallel 2 and data parallel 2 under torchrun on gloo match one process.

Same global batch, same seed: losses and grad norms agree to 1e-5 over 10 steps.
"""

from __future__ import annotations

import pytest
from parity import assert_same, train


@pytest.mark.parametrize("recipe", ["llama2", "gpt"])
def test_tensor_parallel_2_matches_one_process(tmp_path, recipe):
    overrides = [f"recipe={recipe}", "optim.lr=3e-3", "trainer.micro_batch_size=8"]
    single = train(tmp_path / "tp1", overrides)
    tp2 = train(tmp_path / "tp2", [*overrides, "parallel.tensor=2"], nproc=2)
    assert_same(single, tp2)


def test_data_parallel_2_matches_one_process_with_accumulation(tmp_path):
    overrides = ["recipe=gpt", "optim.lr=3e-3", "trainer.micro_batch_size=4"]
    single = train(tmp_path / "dp1", overrides)  # 2 accumulation steps of 4
    dp2 = train(tmp_path / "dp2", overrides, nproc=2)  # 2 ranks x 4
    assert_same(single, dp2)
