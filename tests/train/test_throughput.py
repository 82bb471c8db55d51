"""Throughput accounting: model FLOPs per token, GPU peaks, and MFU in rows and the summary."""

from __future__ import annotations

import logging

import pytest
from helpers import build_model_for, make_config, make_trainer

from stability.runfiles import read_jsonl
from stability.sinks.console import ConsoleProgress
from stability.sinks.jsonl import MetricsWriter
from stability.throughput import gpu_peak_flops, model_flops_per_token


@pytest.mark.parametrize("recipe", ["llama2", "gpt"])
def test_flops_per_token_is_six_per_matmul_parameter_plus_attention(single_process, recipe):
    cfg = make_config(f"recipe={recipe}", "model.num_query_groups=2")
    vocab = 1000
    model = build_model_for(cfg, vocab)
    padded_vocab = model.vocab_size
    matmul = sum(p.numel() for name, p in model.named_parameters()
                 if p.ndim == 2 and "embeddings" not in name)
    if cfg.model.tie_embeddings:  # the output layer is the embedding matrix
        matmul += padded_vocab * cfg.model.hidden_size
    attention = 6 * cfg.model.num_layers * cfg.data.seq_length * cfg.model.hidden_size
    assert model_flops_per_token(cfg.model, padded_vocab, cfg.data.seq_length) == \
        6 * matmul + attention


def test_gpu_peaks_by_name():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("Some Future GPU") is None


def test_rows_summary_and_console_report_mfu(tmp_path, single_process, caplog):
    cfg = make_config("trainer.train_steps=4", "trainer.log_interval=2", "checkpoint.interval=0",
                      "checkpoint.save_final=false")
    caplog.set_level(logging.INFO, logger="stability.progress")
    trainer = make_trainer(cfg, tmp_path, [MetricsWriter(tmp_path),
                                           ConsoleProgress(4, min_seconds=0)],
                           single_process)
    summary = trainer.fit()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
        assert row["model_flops_per_s"] == pytest.approx(
            row["tokens_per_s"] * trainer.throughput.flops_per_token)
    assert rows[0]["mfu"] == rows[1]["mfu"]  # one logging interval, one rate
    assert 0 < summary["mfu"] < 1 and summary["tokens_per_s"] > 0
    progress = [r.getMessage() for r in caplog.records if r.name == "stability.progress"]
    assert len(progress) == 2 and all("mfu" in line for line in progress)  # a line per flush
