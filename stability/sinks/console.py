"""A one-line progress report: step, loss, LR, tokens/s, ETA, through :mod:`logging`.

The lines go to the ``stability.progress`` logger at INFO: under Hydra to the console (plain,
see ``stability/conf/hydra/job_logging/stability.yaml``) and to the run directory's
``train.log`` (with time stamps).
"""

from __future__ import annotations

import logging
import time

from stability.callbacks import Callback, Control, Flush, StepState

log = logging.getLogger("stability.progress")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class ConsoleProgress(Callback):
    """Logs one line per flush, at most every ``min_seconds`` (and always the last step)."""

    name = "console"

    def __init__(self, total_steps: int, min_seconds: float = 2.0,
                 logger: logging.Logger = log) -> None:
        self.total_steps = total_steps
        self.min_seconds = min_seconds
        self.logger = logger
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
        self.logger.info(
            "step %6d/%d | loss %.4f | grad %.3g | lr %.3g | %s tok/s%s | eta %s", row["step"],
            self.total_steps, row["loss"], row["grad_norm"], row["lr"], f"{tps:,.0f}", mfu,
            _duration(eta))
