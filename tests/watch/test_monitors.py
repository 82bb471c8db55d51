"""The monitors' statistics equal direct computations on the same model and step."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_config, make_trainer

from stability.callbacks import Callback
from stability.watch.monitors import Monitors


class Probe(Callback):
    """Captures, around one step, what the direct computations need."""

    name = "probe"

    def __init__(self) -> None:
        self.query_key: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.embedding: torch.Tensor | None = None

    def on_train_start(self, state) -> None:
        for layer in state.model.decoder.layers:
            layer.self_attention.core_attention.register_forward_pre_hook(
                self._capture(layer.layer_number))
        state.model.embedding.register_forward_hook(self._capture_embedding)

    def _capture(self, number):
        def hook(module, args):
            self.query_key.setdefault(number, (args[0].detach().clone(),
                                               args[1].detach().clone(), module.softmax_scale))
        return hook

    def _capture_embedding(self, module, args, output):
        if self.embedding is None:
            self.embedding = output.detach().clone()

    def before_optimizer_step(self, state, control) -> None:
        self.params_before = [p.detach().clone() for p in state.params]
        self.grads = [p.grad.detach().clone() for p in state.params]


def run_one_step(tmp_path, topology, *overrides, rows_fraction=1.0):
    cfg = make_config("size=tiny", "recipe=llama2", "trainer.train_steps=3",
                      "checkpoint.interval=0", "checkpoint.save_final=false",
                      "logger.console=false", "monitors.interval=1",
                      f"monitors.update_rows_fraction={rows_fraction}", *overrides)
    monitors, probe = Monitors(cfg.monitors, cfg.model.num_layers, cfg.trainer.seed), Probe()
    trainer = make_trainer(cfg, tmp_path, [probe, monitors], topology)
    trainer.start(resume=False)
    trainer.train_step()  # Adam state exists from here on
    probe.query_key, probe.embedding = {}, None
    trainer.train_step()
    return trainer, probe, trainer.buffer.flush()[-1]


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) + 1 if "layers" in parts else None


def test_monitors_equal_direct_computations(tmp_path, single_process):
    # Grouped-query attention (4 heads, 1 group): the monitor must repeat keys as SDPA does.
    trainer, probe, recorded = run_one_step(tmp_path, single_process, "model.num_query_groups=1")
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    num_layers = trainer.cfg.model.num_layers

    # Max attention logit of layer N: q.k/sqrt(d) over heads and causal positions, first sequence.
    for number, (query, key, scale) in probe.query_key.items():
        q = query[:, 0].float()                                     # [s, heads, d]
        k = key[:, 0].float().repeat_interleave(q.shape[1] // key.shape[2], dim=1)
        scores = torch.einsum("shd,thd->hst", q, k) * scale
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        expected = scores.masked_fill(~causal, -math.inf).max().item()
        assert recorded[f"attn_logit_max/layer_{number}"] == pytest.approx(expected, rel=1e-5)
    assert recorded["attn_logit_max"] == max(recorded[f"attn_logit_max/layer_{n}"]
                                             for n in range(1, num_layers + 1))

    # Per-layer grad norm and, with every row sampled, the exact update/parameter ratio.
    after = [p.detach() for p in trainer.state.params]
    for number in range(1, num_layers + 1):
        members = [i for i, n in enumerate(names) if layer_of(n) == number]
        grad = math.sqrt(sum(probe.grads[i].double().square().sum().item() for i in members))
        delta = sum((after[i].double() - probe.params_before[i].double()).square().sum().item()
                    for i in members)
        norm = sum(probe.params_before[i].double().square().sum().item() for i in members)
        assert recorded[f"grad_norm/layer_{number}"] == pytest.approx(grad, rel=1e-4)
        assert recorded[f"update_ratio/layer_{number}"] == pytest.approx(
            math.sqrt(delta / norm), rel=1e-4)
    assert recorded["update_ratio_max"] == max(recorded[f"update_ratio/layer_{n}"]
                                               for n in range(1, num_layers + 1))

    # Share of Adam second moments with sqrt(v) < eps, and the embedding output's std.
    eps = trainer.cfg.optim.eps
    v = torch.cat([s["exp_avg_sq"].flatten() for s in trainer.engine.optimizer.state.values()])
    assert recorded["adam_v_below_eps"] == pytest.approx((v.sqrt() < eps).double().mean().item())
    assert 0.0 < recorded["adam_v_below_eps"] < 1.0
    assert recorded["embedding_std"] == pytest.approx(probe.embedding.float().std().item(),
                                                      rel=1e-5)


def test_sampled_update_ratio_estimates_the_exact_one(tmp_path, single_process):
    trainer, _, exact = run_one_step(tmp_path / "exact", single_process, rows_fraction=1.0)
    _, _, sampled = run_one_step(tmp_path / "sampled", single_process, rows_fraction=0.0625)
    for n in range(1, trainer.cfg.model.num_layers + 1):
        key = f"update_ratio/layer_{n}"
        assert sampled[key] == pytest.approx(exact[key], rel=0.25)


def test_attention_probe_reads_evenly_spaced_query_rows(tmp_path, single_process):
    # 128 positions, at most 20 rows: every 7th, ending at the last (127, 120, ..., 1).
    trainer, probe, recorded = run_one_step(tmp_path, single_process,
                                            "monitors.attention_rows=20")
    rows = list(range(127, -1, -7))[::-1]
    assert len(rows) <= 20 and rows[-1] == 127
    for number, (query, key, scale) in probe.query_key.items():
        q, k = query[:, 0].float(), key[:, 0].float()
        scores = torch.einsum("shd,thd->hst", q, k) * scale
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, -math.inf)
        assert recorded[f"attn_logit_max/layer_{number}"] == pytest.approx(
            scores[:, rows].max().item(), rel=1e-5)
