"""The loop's pieces on their own, through the narrow step state: the metrics buffer, the control
object, fault injection, preemption, the skip guard and the CPU engine (no model where none is
needed)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import make_config

from stability.callbacks import Control, Flush
from stability.engine import TorchEngine
from stability.metrics_buffer import MetricsBuffer
from stability.model.loss import LossOutput
from stability.preemption import Preemption, PreemptionWatch
from stability.runfiles import read_jsonl
from stability.sinks.jsonl import EventsWriter
from stability.throughput import Throughput
from stability.watch.actions import SkipGuard
from stability.watch.config import FaultConfig
from stability.watch.fault import FaultInjector


def state(step: int = 0, **kw) -> SimpleNamespace:
    """A stand-in for StepState with what the piece under test reads."""
    return SimpleNamespace(step=step, device=torch.device("cpu"), run_dir=Path("."), **kw)


# ---------------------------------------------------------------------- metrics buffer
def test_buffer_moves_every_statistic_in_one_transfer(monkeypatch):
    buffer = MetricsBuffer(Throughput(flops_per_token=10.0, peak_per_device=None, devices=1))
    transfers = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: (transfers.append(t.numel()),
                                                           real(t))[1])
    for step in (1, 2, 3):
        buffer.throughput.step_started()
        buffer.record("loss", torch.tensor(10.0 - step))
        buffer.record("attn_logit_max", torch.tensor(float(step)))
        buffer.throughput.add(100)
        buffer.end_step({"step": step, "lr": 0.1})
    assert buffer.pending
    rows = buffer.flush()
    assert transfers == [6] and not buffer.pending and buffer.flush() == []
    assert [(r["step"], r["lr"], r["loss"], r["attn_logit_max"]) for r in rows] == [
        (1, 0.1, 9.0, 1.0), (2, 0.1, 8.0, 2.0), (3, 0.1, 7.0, 3.0)]
    assert all(r["tokens_per_s"] > 0 and "mfu" not in r for r in rows)


def test_a_step_that_did_not_finish_leaves_no_row():
    buffer = MetricsBuffer(Throughput(1.0, None, 1))
    buffer.record("loss", torch.tensor(1.0))
    buffer.discard_step()
    buffer.record("grad_norm", torch.tensor(2.0))
    buffer.end_step({"step": 1})
    assert [set(r) - {"tokens_per_s", "model_flops_per_s"} for r in buffer.flush()] == [
        {"step", "grad_norm"}]


# ---------------------------------------------------------------------- control
def test_control_keeps_the_earliest_rollback_and_combines_skips():
    control = Control()
    control.rollback(40, 5, "loss spike at 45")
    control.rollback(30, 5, "grad spike at 35")
    control.rollback(50, 5, "later")
    assert control.rollback_to == (30, 5, "grad spike at 35")
    control.skip_update(torch.tensor(False))
    control.skip_update(torch.tensor(True))
    assert bool(control.take_skip()) and control.take_skip() is None
    control.stop("first")
    control.stop("second")
    assert control.stop_reason == "first"


# ---------------------------------------------------------------------- fault injection
def test_lr_spike_multiplies_the_lr_during_its_steps_only():
    fault = FaultInjector(FaultConfig(at_step=3, kind="lr_spike", magnitude=10.0, duration=2))
    optimizer = SimpleNamespace(param_groups=[{"lr": 1.0}, {"lr": 2.0}])
    lrs = []
    s = state(optimizer=optimizer)
    for step in range(6):
        for group, lr in zip(optimizer.param_groups, (1.0, 2.0)):
            group["lr"] = lr  # what the scheduler sets before each step
        s.step = step
        fault.on_step_start(s)
        lrs.append([g["lr"] for g in optimizer.param_groups])
        s.step = step + 1
        fault.on_step_end(s)
    assert lrs == [[1, 2], [1, 2], [10, 20], [10, 20], [1, 2], [1, 2]]  # steps 3 and 4


def test_bad_batch_and_nan_replace_what_they_enter():
    s = state(step=4, vocab_size=50)
    batch = {"tokens": torch.zeros(2, 8, dtype=torch.long),
             "labels": torch.zeros(2, 8, dtype=torch.long)}
    bad = FaultInjector(FaultConfig(at_step=5, kind="bad_batch"))
    noisy = bad.on_batch(s, batch)
    assert noisy["tokens"].max() > 0 and noisy["tokens"].max() < 50
    assert torch.equal(noisy["labels"], noisy["tokens"].roll(-1, dims=-1))
    assert torch.equal(bad.on_batch(s, batch)["tokens"], noisy["tokens"])  # seeded by the step
    out = LossOutput(*(torch.tensor(v) for v in (3.0, 3.0, 0.0, 5.0, 9.0)))
    nan = FaultInjector(FaultConfig(at_step=5, kind="nan")).on_loss(s, out)
    assert nan.loss.isnan() and nan.cross_entropy.isnan() and nan.logit_max_abs == 9.0
    assert FaultInjector(FaultConfig(at_step=6, kind="nan")).on_loss(s, out) is out


def test_a_fault_fires_once_and_a_rollback_does_not_undo_that():
    fault = FaultInjector(FaultConfig(at_step=2, kind="nan"))
    saved = fault.state_dict()  # a checkpoint from before the fault
    fault.on_step_end(state(step=2))
    assert fault.done and not fault.active(2)
    assert FaultInjector.restore_on_rollback is False  # the loop keeps `done` on a rollback
    fault.load_state_dict(saved)  # a resume does restore it
    assert not fault.done


# ---------------------------------------------------------------------- preemption
def test_a_warning_signal_asks_the_loop_to_checkpoint_and_end():
    previous = []
    old = signal.signal(signal.SIGUSR2, lambda signum, frame: previous.append(signum))
    try:
        preemption = Preemption().install()
        watch, control = PreemptionWatch(preemption), Control()
        watch.on_metrics(state(), Flush([{"step": 1}]), control)
        assert not control.preempted
        os.kill(os.getpid(), signal.SIGUSR2)
        watch.on_metrics(state(), Flush([{"step": 2}]), control)
        assert control.preempted and previous == []  # noted, not yet handed on
        preemption.forward()  # after the checkpoint: to whoever handled it before (submitit)
        assert previous == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, old)


# ---------------------------------------------------------------------- skip guard
def test_skip_guard_decides_without_a_host_sync(monkeypatch):
    guard = SkipGuard(window=16, zscore=6.0, spikes=True, device=torch.device("cpu"))
    decisions = [guard.decide(torch.tensor(3.0 + 0.01 * (i % 3)), torch.tensor(1.0))
                 for i in range(12)]

    def sync(*args, **kwargs):
        raise AssertionError("host sync in SkipGuard.decide")

    for name in ("item", "tolist", "__index__", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    spike = guard.decide(torch.tensor(30.0), torch.tensor(1.0))
    nan = guard.decide(torch.tensor(float("nan")), torch.tensor(1.0))
    monkeypatch.undo()
    assert not any(bool(d) for d in decisions) and bool(spike) and bool(nan)
    assert int(guard.count) == 13  # the spike's finite value entered, the NaN did not


def test_skip_guard_keeps_its_newest_values_when_the_window_changes():
    guard = SkipGuard(window=4, zscore=6.0, spikes=True, device=torch.device("cpu"))
    for value in range(1, 7):  # ring buffer of 4 holds 5, 6, 3, 4
        guard.decide(torch.tensor(float(value)), torch.tensor(0.0))
    longer = SkipGuard(window=8, zscore=6.0, spikes=True, device=torch.device("cpu"))
    longer.load_state_dict(guard.state_dict())
    assert longer.history[0, :4].tolist() == [3.0, 4.0, 5.0, 6.0] and int(longer.count) == 4
    shorter = SkipGuard(window=2, zscore=6.0, spikes=True, device=torch.device("cpu"))
    shorter.load_state_dict(guard.state_dict())
    assert shorter.history[0].tolist() == [5.0, 6.0]


# ---------------------------------------------------------------------- the CPU engine
@pytest.fixture
def engine(single_process):
    def make(**overrides):
        cfg = make_config(*[f"optim.{k}={v}" for k, v in overrides.items()])
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        params = list(model.parameters())
        return TorchEngine(model, [model], params, cfg.optim, single_process), model
    return make


def backward(model, scale: float = 1.0) -> None:
    model.zero_grad()
    (model(torch.ones(2, 4)).square().sum() * scale).backward()


def test_engine_skips_a_step_with_nan_gradients_exactly(engine):
    eng, model = engine()
    backward(model)
    eng.step()
    before = [p.detach().clone() for p in model.parameters()]
    moments = [s["exp_avg"].clone() for s in eng.optimizer.state.values()]
    backward(model, scale=float("nan"))
    eng.step(skip=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments,
                                                            eng.optimizer.state.values()))
    assert all(int(s["step"]) == 1 for s in eng.optimizer.state.values())
    backward(model)
    eng.step(skip=torch.tensor(False))
    assert not torch.equal(before[0], model[0].weight)


def test_engine_clips_to_the_global_norm(engine):
    eng, model = engine()
    backward(model, scale=100.0)
    norm = eng.grad_norm()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert norm == pytest.approx(expected.item(), rel=1e-6) and norm > 1.0
    eng.clip(norm, 1.0)
    assert eng.grad_norm() == pytest.approx(1.0, rel=1e-5)


def test_engine_restores_moments_and_applies_this_runs_betas_and_eps(engine):
    eng, model = engine()
    backward(model)
    eng.step()
    saved = eng.state_dict()
    other, _ = engine(beta2=0.99, eps=1e-8)
    other.load_state_dict(saved)
    group = other.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.99) and group["eps"] == 1e-8
    assert all(int(s["step"]) == 1 for s in other.optimizer.state.values())


# ---------------------------------------------------------------------- the events file
def test_a_resume_keeps_the_events_written_before_its_checkpoint(tmp_path):
    """Events of a trajectory a rollback abandoned (steps 30, 31) were written before the
    checkpoint of step 28 that followed the rollback: a resume from it keeps them."""
    def event(step):
        return {"step": step, "detector": "loss_spike", "metric": "loss", "value": 9.0,
                "threshold": 5.0, "score": 7.0, "severity": "warn", "kind": "spike",
                "action": "rollback"}

    writer = EventsWriter(tmp_path)
    writer.on_restore(state(step=0), "resume")
    writer.on_metrics(state(step=31), Flush([{"step": 31}], [event(30), event(31)]), Control())
    writer.on_restore(state(step=24), "rollback")  # the file is a record: not cut
    checkpoint = writer.state_dict()  # saved at step 28, after the rollback
    writer.on_metrics(state(step=35), Flush([{"step": 35}], [event(35)]), Control())
    writer.on_close(state(), {})

    resumed = EventsWriter(tmp_path)
    resumed.load_state_dict(checkpoint)
    resumed.on_restore(state(step=28), "resume")
    resumed.on_close(state(), {})
    assert [e["step"] for e in read_jsonl(tmp_path / "events.jsonl")] == [30, 31]
