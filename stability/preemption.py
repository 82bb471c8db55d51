"""Preemption and time limits: checkpoint at the next step boundary, then requeue.

SLURM sends a warning signal before a time limit or a preemption (``--signal=USR2@120``, which
hydra's submitit launcher sets from ``signal_delay_s``). We only note the signal; the loop
finishes its step, writes a checkpoint, and then hands the signal to whoever handled it before
us: under submitit that requeues the job, whose re-run resumes from the checkpoint. Without a
previous handler the default action ends the process.

``Preemption`` holds the signal handlers (installed by ``stability.train.run`` around the run);
``PreemptionWatch`` is the callback that tells the loop, at a flush, that some rank got one.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

from stability.callbacks import Callback, Control, Flush, StepState

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class Preemption:
    """Catches the warning signals while installed."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame) -> None:
        self.received = signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def forward(self) -> None:
        """Give the received signal to the previous handler (submitit: requeue and exit)."""
        signum = self.received
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.uninstall()
        if callable(previous):
            previous(signum, None)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)


class PreemptionWatch(Callback):
    """Asks the loop to checkpoint and end (status ``preempted``) once any rank got a warning
    signal. The ranks agree at each flush (a sync point anyway), so all of them stop at the
    same step."""

    name = "preemption"

    def __init__(self, preemption: Preemption) -> None:
        self.preemption = preemption

    def on_metrics(self, state: StepState, flush: Flush, control: Control) -> None:
        received = self.preemption.received is not None
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([float(received)], device=state.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            received = bool(flag.item())
        if received:
            control.preempt()
