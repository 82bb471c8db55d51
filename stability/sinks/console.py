"""A one-line progress report: step, loss, LR, tokens/s, ETA."""

from __future__ import annotations

import sys
import time

from stability.callbacks import Callback, Control, Flush, StepState


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class ConsoleProgress(Callback):
    """Prints one line per flush, at most every ``min_seconds`` (and always the last step)."""

    name = "console"

    def __init__(self, total_steps: int, min_seconds: float = 2.0, stream=sys.stdout) -> None:
        self.total_steps = total_steps
        self.min_seconds = min_seconds
        self.stream = stream
        self._last_print = 0.0

    def on_metrics(self, state: StepState, flush: Flush, control: Control) -> None:
        row = flush.rows[-1]
        now = time.monotonic()
        if now - self._last_print < self.min_seconds and row["step"] < self.total_steps:
            return
        self._last_print = now
        tps = row.get("tokens_per_s", 0.0)
        mean_step = row.get("time", 0.0) / max(row["step"], 1)  # mean over the run: steadier
        eta = (self.total_steps - row["step"]) * mean_step
        mfu = f" | mfu {row['mfu']:.1%}" if "mfu" in row else ""
        print(
            f"step {row['step']:>6d}/{self.total_steps} | loss {row['loss']:.4f} | "
            f"grad {row['grad_norm']:.3g} | lr {row['lr']:.3g} | {tps:,.0f} tok/s{mfu} | "
            f"eta {_duration(eta)}",
            file=self.stream, flush=True,
        )
