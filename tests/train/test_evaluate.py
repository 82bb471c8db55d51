"""Held-out evaluation: what eval_loss is, when it is computed, and that it changes nothing."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_config, make_trainer

from stability.model.loss import vocab_parallel_loss
from stability.runfiles import read_jsonl
from stability.train import default_callbacks

TINY = ["size=tiny", "optim.lr=3e-3", "trainer.train_steps=6", "checkpoint.interval=0",
        "checkpoint.save_final=false", "logger.console=false"]


def trained(tmp_path, topology, *overrides):
    cfg = make_config(*TINY, *overrides)
    trainer = make_trainer(cfg, tmp_path, default_callbacks(cfg, tmp_path, True), topology)
    return trainer, trainer.fit(), read_jsonl(tmp_path / "metrics.jsonl")


def test_eval_loss_is_the_mean_held_out_cross_entropy(tmp_path, single_process):
    trainer, summary, rows = trained(tmp_path, single_process, "trainer.eval_interval=4",
                                     "trainer.eval_batches=3")
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 6]  # every 4 steps, the end
    assert summary["eval_loss"] == rows[-1]["eval_loss"]
    batches = trainer.evaluator.batches
    assert len(batches) == 3 and batches[0]["tokens"].shape == (8, 128)  # 3 global batches
    valid = trainer.data.valid
    assert torch.equal(batches[0]["tokens"][0], torch.as_tensor(valid[0]["tokens"]))
    trainer.model.eval()
    with torch.no_grad():
        direct = torch.stack([vocab_parallel_loss(
            trainer.model(input_ids=b["tokens"], position_ids=b["position_ids"],
                          attention_mask=trainer.mask), b["labels"], b["loss_mask"], 0.0
        ).cross_entropy for b in batches]).mean()
    assert rows[-1]["eval_loss"] == pytest.approx(direct.item(), rel=1e-6)
    assert 0 < rows[-1]["eval_loss"] < math.log(trainer.model.vocab_size) + 1


def test_evaluation_changes_nothing_in_training(tmp_path, single_process):
    _, _, evaluated = trained(tmp_path / "a", single_process, "trainer.eval_interval=2")
    _, summary, plain = trained(tmp_path / "b", single_process, "trainer.eval_interval=null")
    assert [r["loss"] for r in evaluated] == [r["loss"] for r in plain]
    assert [r["grad_norm"] for r in evaluated] == [r["grad_norm"] for r in plain]
    assert not any("eval_loss" in r for r in plain) and math.isnan(summary["eval_loss"])
