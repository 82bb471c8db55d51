"""Per-step statistics kept on the device, moved to the host in one transfer per flush.

The loop and the callbacks ``record`` device tensors during a step; ``end_step`` closes the
step's row with its host numbers (step, LR, tokens, time); ``flush`` reduces every pending
statistic over data-parallel ranks (the mean; the maximum for keys with "max" in their name),
moves them to the host in one ``tolist`` (the only host sync of the metrics path) and returns
the rows. Only the loop flushes, at one point per step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from stability.throughput import Throughput


class MetricsBuffer:
    """Rows of statistics between two flushes.

    Args:
        throughput: Adds tokens/s, model FLOP/s and MFU of the interval to each flushed row.
        dp_group: The data-parallel process group; None without data parallelism.
        dp_size: Its size.
    """

    def __init__(self, throughput: Throughput, dp_group: Any = None, dp_size: int = 1) -> None:
        self.throughput = throughput
        self.dp_group = dp_group
        self.dp_size = dp_size
        self._current: dict[str, torch.Tensor] = {}
        self._pending: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []

    def record(self, key: str, value: torch.Tensor) -> None:
        """A statistic of the current step (detached; stays on its device until the flush)."""
        self._current[key] = value.detach()

    def discard_step(self) -> None:
        """Forget what the current step recorded (a step that did not finish)."""
        self._current = {}

    def end_step(self, host: dict[str, Any]) -> None:
        """Close the current step's row; ``host`` holds its host numbers (``step`` first)."""
        self._pending.append((host, self._current))
        self._current = {}

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def flush(self) -> list[dict[str, Any]]:
        """The pending rows with every statistic on the host, in step order."""
        if not self._pending:
            return []
        layout = [(host, list(tensors)) for host, tensors in self._pending]
        flat = torch.stack([tensors[key].float().reshape(())
                            for _, tensors in self._pending for key in tensors])
        if self.dp_size > 1:
            is_max = torch.tensor(["max" in key for _, keys in layout for key in keys],
                                  device=flat.device)
            summed, maxed = flat.clone(), flat.clone()
            dist.all_reduce(summed, group=self.dp_group)
            dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=self.dp_group)
            flat = torch.where(is_max, maxed, summed / self.dp_size)
        values = iter(flat.tolist())  # the one host transfer
        rates = self.throughput.interval()  # tokens/s, model FLOP/s, MFU since the last flush
        rows = []
        for host, keys in layout:
            row = dict(host)
            row.update(rates)
            row.update({key: next(values) for key in keys})
            rows.append(row)
        self._pending.clear()
        return rows
