"""How this process runs: device, precision, attention backend, CPU adjustments. Decided once.

``Runtime.resolve(cfg)`` is called once, in ``stability.train.run`` right after the config is
validated, and the frozen result is passed to everything that builds or moves tensors. It is
the only place that asks whether CUDA is available; nothing else decides the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stability.config import Config
from stability.errors import ConfigError
from stability.model.backends import backend_available, resolve_attention_backend

GPU_LOG_INTERVAL = 10
"""Default steps between flushes on GPU: each flush waits for the device, so flushing every
step would stall the queue once per step (OLMo-core and torchtitan log every 10 or more)."""


@dataclass(frozen=True)
class Runtime:
    """The machine-dependent decisions of a run."""

    device_type: str
    """cpu | cuda (``trainer.device`` with auto resolved)."""
    precision: str
    """fp32 | bf16 (``trainer.precision`` with auto resolved)."""
    attention_backend: str
    """sdpa | local | flash | te (``model.attention_backend`` with auto resolved)."""
    cpu_initialization: bool
    """Initial weights are drawn on the CPU, then moved (``model.cpu_initialization``)."""
    threads: int | None = None
    """torch intra-op threads (``trainer.threads``); None = torch's default."""
    log_interval: int = 1
    """Steps between metric flushes (``trainer.log_interval`` with None resolved)."""
    fusions: bool = False
    """megatron-core's fused kernels (``model.fusions`` with None resolved)."""

    @property
    def device(self) -> torch.device:
        """The device type (a rank's index is set by ``parallel.init``)."""
        return torch.device(self.device_type)

    @property
    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def output_in_loss(self) -> bool:
        """The loss applies the output layer block by block, logits never whole
        (``stability.model.loss.linear_vocab_loss``; only at one tensor-parallel rank). On the
        CPU (fp32 there), where the logits' memory traffic costs a sixth of the output layer and
        loss; GPU runs keep megatron's logits until this has been measured there."""
        return self.device_type == "cpu"

    @property
    def params_dtype(self) -> torch.dtype:
        """The dtype of the model's weights (fp32 masters live in the optimizer)."""
        return torch.bfloat16 if self.bf16 else torch.float32

    @classmethod
    def resolve(cls, cfg: Config, cuda_available: bool | None = None) -> Runtime:
        """Decide from ``cfg`` and this machine; ConfigError where the machine can't do what
        the config asks (``cuda_available`` overrides the probe, for tests)."""
        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        t, m = cfg.trainer, cfg.model
        device = t.device if t.device != "auto" else ("cuda" if cuda_available else "cpu")
        if device == "cuda" and not cuda_available:
            raise ConfigError("trainer.device", t.device, "auto or cpu (no CUDA device visible)")
        precision = t.precision if t.precision != "auto" else (
            "bf16" if device == "cuda" else "fp32")
        if device == "cpu" and precision == "bf16":
            raise ConfigError("trainer.precision", t.precision,
                              "fp32 or auto on the CPU (bf16 mixed precision needs a GPU)")
        if device == "cpu" and cfg.optim.distributed:
            raise ConfigError("optim.distributed", True,
                              "false on the CPU (megatron's distributed optimizer needs a GPU)")
        if device == "cuda" and not cfg.optim.embedding_weight_decay:
            raise ConfigError("optim.embedding_weight_decay", False,
                              "true on GPU (megatron's optimizer decays the embedding)")
        if m.attention_backend in ("te", "flash") and not backend_available(
                m.attention_backend, device):
            package = "transformer-engine" if m.attention_backend == "te" else "flash-attn"
            raise ConfigError("model.attention_backend", m.attention_backend,
                              f"auto, sdpa or local ({m.attention_backend} needs a GPU and "
                              f"{package})")
        cpu_init = m.cpu_initialization if m.cpu_initialization is not None else device == "cpu"
        log_interval = t.log_interval or (GPU_LOG_INTERVAL if device == "cuda" else 1)
        fusions = m.fusions if m.fusions is not None else device == "cuda"
        return cls(device_type=device, precision=precision,
                   attention_backend=resolve_attention_backend(m.attention_backend, device),
                   cpu_initialization=cpu_init, threads=t.threads, log_interval=log_interval,
                   fusions=fusions)

    def apply(self) -> None:
        """Process-wide settings: torch's thread count, and on the CPU the adjustments that let
        megatron-core run there (``stability.cpu``), also on a machine that has a GPU."""
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device_type == "cpu":
            from stability import cpu

            cpu.apply()
