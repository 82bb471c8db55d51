"""Deterministic, resumable micro batches over megatron-core's GPTDataset.

Batch order. megatron-core's `GPTDataset` (train split) shuffles documents and samples with
`seed` and exposes them as sample 0, 1, 2, ... (it repeats epochs by itself when more samples are
asked for than one epoch holds). With G = global batch size, m = micro batch size, D = data-
parallel size and A = G / (m * D) accumulation steps, global batch k is samples [k*G, (k+1)*G),
and micro step a (0 <= a < A) on data-parallel rank r reads

    samples k*G + (a*D + r)*m  ...  k*G + (a*D + r)*m + m - 1.

So every global batch is the same set of samples whatever D and m are: one process with G=8,
m=4 (A=2) sees the same 8 samples as 2 ranks with m=4 (A=1). Positions past the end of the
dataset wrap around (this happens only after skipping batches beyond the planned sample count).

The loader's position is `consumed_samples` (completed global batches times G) plus the micro
step inside the current global batch; `state_dict()` saves both, and `skip_global_batches(n)`
moves the position n global batches ahead (PaLM's "skip the data around a spike").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from stability.errors import ConfigError

if TYPE_CHECKING:
    from megatron.core.datasets.gpt_dataset import GPTDataset

Batch = dict[str, torch.Tensor]
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def collate(samples: list[dict[str, torch.Tensor]]) -> Batch:
    """Stacks GPTDataset samples: tokens/labels/position_ids int64, loss_mask float32."""
    batch = {key: torch.stack([sample[key] for sample in samples]) for key in BATCH_KEYS}
    batch["loss_mask"] = batch["loss_mask"].float()
    return batch


class BatchLoader:
    """This data-parallel rank's micro batches, in the order defined in the module docstring.

    Args:
        dataset: A train-split GPTDataset (any sequence of samples works).
        global_batch_size: Samples per optimizer step over all data-parallel ranks (G).
        micro_batch_size: Samples per forward/backward on one rank (m).
        dp_rank: This rank's index among the data-parallel ranks (r).
        dp_size: Number of data-parallel ranks (D).
        num_workers: Background threads reading ahead (2 micro batches each); 0 reads each
            micro batch when it is asked for.
    """

    def __init__(
        self,
        dataset: GPTDataset,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        num_workers: int = 0,
    ) -> None:
        check_batch_shape(global_batch_size, micro_batch_size, dp_rank, dp_size)
        if num_workers < 0:
            raise ConfigError("data.num_workers", num_workers, "an integer >= 0")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.accumulation_steps = global_batch_size // (micro_batch_size * dp_size)
        self.num_workers = num_workers
        self.consumed_samples = 0
        self.micro_step = 0
        self.skipped_global_batches = 0
        self._executor: ThreadPoolExecutor | None = None
        self._ahead: deque[Future[Batch]] = deque()  # reads of the next positions, in order
        self._next_to_read = (0, 0)  # (global batch, micro step) after the last one in _ahead

    def micro_batch_indices(self, global_batch: int, micro_step: int) -> list[int]:
        """Dataset indices read by this rank at `micro_step` of global batch `global_batch`."""
        start = (
            global_batch * self.global_batch_size
            + (micro_step * self.dp_size + self.dp_rank) * self.micro_batch_size
        )
        size = len(self.dataset)
        return [(start + j) % size for j in range(self.micro_batch_size)]

    def next_micro_batch(self) -> Batch:
        """Returns the next micro batch (CPU tensors of shape [micro, seq]) and advances."""
        if self.num_workers > 0:
            self._read_ahead()
            batch = self._ahead.popleft().result()
        else:
            batch = self._read(self._global_batch, self.micro_step)
        self.micro_step += 1
        if self.micro_step == self.accumulation_steps:
            self.micro_step = 0
            self.consumed_samples += self.global_batch_size
        return batch

    def _read(self, global_batch: int, micro_step: int) -> Batch:
        return collate(
            [self.dataset[i] for i in self.micro_batch_indices(global_batch, micro_step)]
        )

    def _read_ahead(self) -> None:
        """Keeps 2 * num_workers reads of the coming positions in flight on background threads."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="data")
        if not self._ahead:
            self._next_to_read = (self._global_batch, self.micro_step)
        while len(self._ahead) < 2 * self.num_workers:
            global_batch, micro_step = self._next_to_read
            self._ahead.append(self._executor.submit(self._read, global_batch, micro_step))
            micro_step += 1
            if micro_step == self.accumulation_steps:
                global_batch, micro_step = global_batch + 1, 0
            self._next_to_read = (global_batch, micro_step)

    def _forget_reads_ahead(self) -> None:
        """Drops reads of positions that are no longer next (after a skip or a load)."""
        for future in self._ahead:
            future.cancel()
        self._ahead.clear()

    @property
    def _global_batch(self) -> int:
        return self.consumed_samples // self.global_batch_size

    def skip_global_batches(self, n: int) -> None:
        """Moves ahead by `n` whole global batches without reading them.

        Raises:
            ValueError: When `n` is negative or the loader stands inside a global batch.
        """
        if n < 0:
            raise ValueError(f"skip_global_batches(n={n}): n must be >= 0")
        if self.micro_step != 0:
            raise ValueError(
                f"skip_global_batches(n={n}) inside a global batch (micro step "
                f"{self.micro_step} of {self.accumulation_steps}); skip between optimizer steps"
            )
        self.consumed_samples += n * self.global_batch_size
        self.skipped_global_batches += n
        self._forget_reads_ahead()

    def state_dict(self) -> dict[str, int]:
        """The position: completed samples over all ranks, micro step, and what was skipped."""
        return {
            "consumed_samples": self.consumed_samples,
            "micro_step": self.micro_step,
            "global_batch_size": self.global_batch_size,
            "skipped_global_batches": self.skipped_global_batches,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continues from a `state_dict()`; the global batch size may change between batches.

        Raises:
            ValueError: When the state is mid-batch or off this loader's global-batch grid.
        """
        consumed = int(state["consumed_samples"])
        micro_step = int(state.get("micro_step", 0))
        saved_size = int(state.get("global_batch_size", self.global_batch_size))
        if saved_size != self.global_batch_size and (
            micro_step != 0 or consumed % self.global_batch_size != 0
        ):
            raise ValueError(
                f"data state (consumed_samples={consumed}, micro_step={micro_step}, "
                f"global_batch_size={saved_size}) cannot resume with global_batch_size="
                f"{self.global_batch_size}: resume between global batches of the new size"
            )
        if not 0 <= micro_step < self.accumulation_steps:
            raise ValueError(
                f"data state micro_step={micro_step} is outside 0..{self.accumulation_steps - 1}"
            )
        self.consumed_samples = consumed
        self.micro_step = micro_step
        self.skipped_global_batches = int(state.get("skipped_global_batches", 0))
        self._forget_reads_ahead()


def eval_batches(
    dataset: GPTDataset,
    micro_batch_size: int,
    *,
    dp_rank: int = 0,
    dp_size: int = 1,
    max_samples: int | None = None,
) -> Iterator[Batch]:
    """This rank's micro batches over the first `max_samples` samples of an eval split.

    Micro step s on rank r reads samples (s*D + r)*m ... +m-1, like training; only whole steps
    over all ranks are used, so every rank yields the same number of batches.
    """
    check_batch_shape(micro_batch_size * dp_size, micro_batch_size, dp_rank, dp_size)
    total = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    for step in range(total // (micro_batch_size * dp_size)):
        start = (step * dp_size + dp_rank) * micro_batch_size
        yield collate([dataset[i] for i in range(start, start + micro_batch_size)])


def check_batch_shape(global_size: int, micro_size: int, dp_rank: int, dp_size: int) -> None:
    """Raises ConfigError unless 0 <= dp_rank < dp_size and global_size = k * micro * dp_size."""
    if micro_size < 1:
        raise ConfigError("trainer.micro_batch_size", micro_size, "an integer >= 1")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ConfigError("dp_rank", dp_rank, f"0 <= dp_rank < dp_size (dp_size={dp_size})")
    if global_size < 1 or global_size % (micro_size * dp_size) != 0:
        raise ConfigError(
            "trainer.global_batch_size",
            global_size,
            f"a positive multiple of micro_batch_size * data-parallel size = "
            f"{micro_size} * {dp_size}",
        )
