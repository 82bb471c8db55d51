"""Throughput accounting: model FLOPs per token, the device's peak, and MFU.

MFU (model FLOPs utilisation, PaLM appendix B) = model FLOPs per second / peak FLOPs per
second of the devices. Model FLOPs count the matmuls a step must do (6 per parameter per token
for forward + backward, the output layer included, plus causal attention's QK^T and AV), not
what the implementation happens to do (no recomputation, no padding). The peak is the dense
bf16 tensor-core rate of the GPU from a table of data sheets, or on CPU this machine's fp32
matmul rate, measured once per process (a few milliseconds).
"""

from __future__ import annotations

import functools
import time

import torch

from stability.model.config import ModelConfig

# Dense (not 2:4 sparse) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s. Longer
# names first: "H100 PCIe" must match before "H100".
GPU_BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
)


def model_flops_per_token(m: ModelConfig, vocab_size: int, seq_length: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + causal attention scores and values.

    Matmul parameters are those of every layer's QKV, output projection and MLP, plus the
    output layer (vocab x d); norms, biases and the embedding lookup do no matmul.
    """
    h, heads = m.hidden_size, m.num_attention_heads
    head_dim = h // heads
    groups = m.query_groups
    attention = h * (heads + 2 * groups) * head_dim + heads * head_dim * h
    mlp = (3 if m.activation == "swiglu" else 2) * h * m.ffn_size
    dense = m.num_layers * (attention + mlp) + vocab_size * h
    # QK^T and AV: 2 x 2 s d FLOPs per token and layer forward, x3 with backward, halved by
    # the causal mask.
    scores = 6 * m.num_layers * seq_length * h
    return 6 * dense + scores


def gpu_peak_flops(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (``torch.cuda.get_device_name``), if known."""
    for key, peak in GPU_BF16_PEAK_FLOPS:
        if key.lower() in name.lower():
            return peak
    return None


@functools.cache
def cpu_matmul_flops(threads: int, n: int = 1024, reps: int = 3) -> float:
    """This machine's fp32 matmul rate (FLOP/s) on ``threads`` threads, best of ``reps``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return gpu_peak_flops(name), f"{name} dense bf16 data sheet"
    threads = torch.get_num_threads()
    return cpu_matmul_flops(threads), f"measured fp32 matmul on {threads} CPU thread(s)"


class Throughput:
    """Tokens/s, model FLOP/s and MFU of the steps between two metric flushes.

    Timed on the host between the first step after a flush and the host transfer of the next
    flush (which waits for the device), so GPU work queued ahead is counted and checkpoint
    writes between intervals are not.
    """

    def __init__(self, flops_per_token: float, peak_per_device: float | None,
                 devices: int) -> None:
        self.flops_per_token = flops_per_token
        self.peak = None if peak_per_device is None else peak_per_device * devices
        self.started: float | None = None
        self.tokens = 0
        self.total_tokens = 0
        self.total_seconds = 0.0

    def step_started(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def interval(self) -> dict[str, float]:
        """Close the interval (call after the flush's host transfer); its rates."""
        if self.started is None or not self.tokens:
            return {}
        seconds = max(time.perf_counter() - self.started, 1e-9)
        rates = self._rates(self.tokens, seconds)
        self.total_tokens += self.tokens
        self.total_seconds += seconds
        self.started, self.tokens = None, 0
        return rates

    def summary(self) -> dict[str, float]:
        """Rates over every interval of this process (resumed runs: since the resume)."""
        return self._rates(self.total_tokens, self.total_seconds) if self.total_tokens else {}

    def _rates(self, tokens: int, seconds: float) -> dict[str, float]:
        flops = tokens * self.flops_per_token / seconds
        rates = {"tokens_per_s": tokens / seconds, "model_flops_per_s": flops}
        if self.peak:
            rates["mfu"] = flops / self.peak
        return rates
