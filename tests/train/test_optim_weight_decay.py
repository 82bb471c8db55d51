"""optim.weight_decay_lr_independent: decay by weight_decay * lr_t / lr per step, whatever the
peak LR; off (the default), AdamW's coupled lr_t * weight_decay, as before."""

from __future__ import annotations

import pytest
import torch
from helpers import make_config

from stability.optim.adamw import build_optimizer, build_scheduler


def _decay_per_step(lr: float, independent: bool, steps: int = 30) -> list[float]:
    """The factor a weight with zero gradient is multiplied by at each step."""
    cfg = make_config(f"optim.lr={lr}", "optim.min_lr=0", "optim.weight_decay=1e-2",
                      "optim.warmup_steps=10", "trainer.train_steps=40",
                      f"optim.weight_decay_lr_independent={str(independent).lower()}")
    model = torch.nn.Linear(4, 4, bias=False, dtype=torch.float64)  # 1 - 1e-5 exactly
    torch.nn.init.ones_(model.weight)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.train_steps)
    factors = []
    for _ in range(steps):
        scheduler.step(1)
        before = model.weight.detach().clone()
        model.weight.grad = torch.zeros_like(model.weight)  # Adam's update is 0: decay alone
        optimizer.step()
        factors.append((model.weight / before).mean().item())
    return factors


@pytest.mark.parametrize("lr", [1e-3, 0.3])
def test_independent_decay_is_wd_times_lr_fraction(lr):
    cfg = make_config(f"optim.lr={lr}", "optim.min_lr=0", "trainer.train_steps=40",
                      "optim.warmup_steps=10")
    sched = build_scheduler(build_optimizer(torch.nn.Linear(2, 2), cfg.optim), cfg.optim,
                            cfg.trainer.train_steps)
    fractions = []
    for _ in range(30):
        sched.step(1)
        fractions.append(sched.get_lr(sched.optimizer.param_groups[0]) / lr)
    got = _decay_per_step(lr, independent=True)
    want = [1 - 1e-2 * f for f in fractions]
    assert got == pytest.approx(want, rel=1e-5)


def test_independent_decay_does_not_depend_on_the_peak_lr():
    assert _decay_per_step(1e-3, True) == pytest.approx(_decay_per_step(0.3, True), rel=1e-5)


def test_default_is_coupled_adamw_decay():
    assert make_config().optim.weight_decay_lr_independent is False
    small, large = _decay_per_step(1e-3, False), _decay_per_step(0.3, False)
    # coupled: the decay per step scales with the LR (1 - lr_t * wd)
    assert (1 - large[-1]) / (1 - small[-1]) == pytest.approx(300, rel=1e-3)
