"""The ``optim`` section of the run configuration (no torch: the CLI reads it)."""

from __future__ import annotations

from dataclasses import dataclass

from stability.errors import ConfigError, in_range, one_of, positive

DECAY_STYLES = ("cosine", "linear", "WSD", "constant", "inverse-square-root")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (megatron-core's OptimizerParamScheduler)."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 1e-5
    """Learning rate at the end of the decay."""
    warmup_steps: int = 2000
    """Linear warmup steps. CPU-scale presets set it as a share of the run with the resolver
    ``${steps_fraction:${trainer.train_steps},0.1}``."""
    decay_style: str = "cosine"
    """cosine | linear | WSD | constant | inverse-square-root."""
    decay_steps: int | None = None
    """Steps from 0 to the end of decay; None = trainer.train_steps."""
    wsd_decay_fraction: float = 0.2
    """For WSD: the share of decay_steps spent annealing."""
    eps: float = 1e-5
    """Adam epsilon."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW); never applied to norms and biases."""
    weight_decay_lr_independent: bool = False
    """Decay weights by weight_decay * lr_t / lr per step (lr = the peak LR), so the decay
    strength does not change with the peak LR; false = AdamW's coupled lr_t * weight_decay."""
    embedding_weight_decay: bool = True
    """Apply weight decay to the embedding (and untied output) weights."""
    clip_grad: float = 1.0
    """Clip the global grad norm to this value; 0 = off."""
    distributed: bool = False
    """GPU only: megatron-core's distributed optimizer (optimizer state and fp32 master weights
    sharded over data parallel). GPU runs always use megatron-core's DDP and optimizer; CPU runs
    torch DDP and AdamW."""

    def validate(self) -> None:
        """Raise ConfigError on the first bad value of this section."""
        one_of("optim.decay_style", self.decay_style, DECAY_STYLES)
        positive("optim.lr", self.lr)
        positive("optim.min_lr", self.min_lr, zero_ok=True)
        if self.min_lr > self.lr:
            raise ConfigError("optim.min_lr", self.min_lr, f"at most optim.lr={self.lr}")
        positive("optim.eps", self.eps)
        in_range("optim.beta1", self.beta1, 0.0, 1.0)
        in_range("optim.beta2", self.beta2, 0.0, 1.0)
        positive("optim.weight_decay", self.weight_decay, zero_ok=True)
        positive("optim.clip_grad", self.clip_grad, zero_ok=True)
        positive("optim.warmup_steps", self.warmup_steps, zero_ok=True)
        in_range("optim.wsd_decay_fraction", self.wsd_decay_fraction, 0.0, 1.0, low_open=True,
                 high_open=False)
        if self.decay_steps is not None and not self.warmup_steps < self.decay_steps:
            raise ConfigError("optim.decay_steps", self.decay_steps,
                              "more than the warmup steps")

    def decay_steps_for(self, train_steps: int) -> int:
        """Steps from 0 to the end of the decay in a run of ``train_steps``."""
        return self.decay_steps or train_steps
