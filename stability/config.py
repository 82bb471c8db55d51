"""Typed configuration: the schema of every run, registered in Hydra's ConfigStore.

The dataclasses below are the schema; YAML files under ``conf/`` only set values. ``validate``
runs once, before any work starts, and raises :class:`ConfigError` naming the key, the bad value
and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from stability.data.config import DataConfig
from stability.errors import ConfigError

NORM_TYPES = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post", "sandwich")
POSITION_EMBEDDINGS = ("learned", "rope")
ACTIVATIONS = ("gelu", "swiglu")
ATTENTION_BACKENDS = ("auto", "sdpa", "local", "flash", "te")
DECAY_STYLES = ("cosine", "linear", "WSD", "constant", "inverse-square-root")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
WANDB_MODES = ("offline", "online", "disabled")
ACTIONS = ("log", "alert", "skip_step", "rollback", "stop")
FAULT_KINDS = ("lr_spike", "bad_batch", "nan")


@dataclass
class ModelConfig:
    """The transformer and every stability knob of its architecture."""

    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Model width d."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None = num_attention_heads (plain MHA)."""
    ffn_hidden_size: int | None = None
    """MLP width; None = 4d for GELU, LLaMA's round_up(8d/3, 256) for SwiGLU."""
    norm_type: str = "rmsnorm"
    """layernorm | rmsnorm."""
    norm_position: str = "pre"
    """pre (x + F(N(x))) | post (N(x + F(x))) | sandwich (x + N(F(N(x))))."""
    norm_eps: float = 1e-5
    """Epsilon of every norm."""
    scaled_embedding: bool = False
    """Multiply the embedding output by sqrt(d) ("Spike No More")."""
    embedding_layernorm: bool = False
    """Apply a norm (of norm_type) to the embedding output (BLOOM-style)."""
    init_std: float = 0.02
    """Std of the normal init of every weight matrix."""
    embedding_init_std: float | None = None
    """Std of the embedding init; None = init_std."""
    scaled_init_output_layers: bool = True
    """Megatron's init of the output projections with init_std / sqrt(2 * num_layers)."""
    qk_layernorm: bool = False
    """Normalise queries and keys per head before the dot product (Wortsman et al. 2023)."""
    position_embedding: str = "rope"
    """learned (absolute) | rope."""
    rotary_base: int = 10000
    """RoPE base."""
    activation: str = "swiglu"
    """gelu | swiglu."""
    bias: bool = False
    """Biases in linear layers."""
    tie_embeddings: bool = False
    """Share the input embedding and the output layer."""
    attention_backend: str = "auto"
    """auto (Transformer Engine > flash-attn > SDPA, by what is installed; TE and flash-attn on
    GPU only) | sdpa | local (megatron's DotProductAttention) | flash | te (TE's layer spec)."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    cpu_initialization: bool | None = None
    """Draw the initial weights on the CPU and then move them; None = on CPU runs only. true on
    a GPU starts from exactly the weights of the CPU run with the same seed (parity checks);
    slow for large models."""
    vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times the tensor-parallel size (Megatron)."""


@dataclass
class LossConfig:
    """The training objective."""

    z_loss: float = 0.0
    """Coefficient of the z-loss, coef * mean(logsumexp(logits)^2); 0 = off (PaLM uses 1e-4)."""


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


@dataclass
class TrainerConfig:
    """The loop: steps, batch, seed, device."""

    train_steps: int = 200
    """Optimizer steps."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks."""
    micro_batch_size: int = 8
    """Sequences per forward pass on one rank; accumulation = global / (micro * dp)."""
    seed: int = 1234
    """Seed of init, data order and dropout."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda."""
    precision: str = "auto"
    """auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16. bf16 (GPU only) keeps bf16 weights for the
    matmuls, fp32 master weights and gradient reduction in the optimizer, and fp32 softmax,
    logsumexp and loss."""
    threads: int | None = None
    """torch intra-op threads on CPU; None = torch's default."""
    log_interval: int = 1
    """Steps between metric rows (one host sync per flush on GPU)."""


@dataclass
class ParallelConfig:
    """Model parallelism; data parallelism is what is left of the world size."""

    tensor: int = 1
    """Tensor-parallel size."""
    pipeline: int = 1
    """Pipeline-parallel size."""
    virtual_pipeline: int | None = None
    """Virtual stages per pipeline rank (interleaved schedule); None = off."""


@dataclass
class CheckpointConfig:
    """Checkpoints under <run_dir>/checkpoints."""

    interval: int = 100
    """Steps between checkpoints; 0 = only at the end."""
    resume: str = "auto"
    """auto (latest complete checkpoint of the run directory, if any) | never."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    save_final: bool = True
    """Write a checkpoint at the end of training."""


@dataclass
class WandbConfig:
    """Weights & Biases sink."""

    mode: str = "disabled"
    """offline | online | disabled."""
    project: str = "stability"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); None = the default of the API key."""
    name: str | None = None
    """Run name; None = the run directory's name."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""
    alert_min_interval_steps: int = 50
    """At most one alert per (detector, metric) in this many steps (errors are exempt)."""
    max_alerts: int = 20
    """At most this many alerts per run; later events only go to the events table."""
    table_interval_steps: int = 100
    """Re-log the events table at most every this many steps while new events arrive."""


@dataclass
class MonitorConfig:
    """Statistics worth watching, recorded as device tensors (no host sync on the hot path)."""

    enabled: bool = True
    """Record the monitors below (loss, grad norm and logit statistics are always recorded)."""
    interval: int = 10
    """Steps between per-layer grad norms and Adam second-moment health (full passes over
    gradients and optimizer state)."""
    attention_interval: int = 1
    """Steps between max attention logits (an extra q.k^T per layer on the first sequence)."""
    update_interval: int = 1
    """Steps between update/parameter ratios and embedding output std (cheap: see below)."""
    update_rows_fraction: float = 0.0625
    """Share of each weight's rows (fixed, random) on which update ratios are measured; 1 =
    exact. Adam's per-element updates are of similar size, so a sample estimates the ratio
    well at a fraction of a full pass over the parameters."""


def _default_detectors() -> list[str]:
    from stability.detectors import DEFAULT_DETECTORS

    return list(DEFAULT_DETECTORS)


@dataclass
class DetectorsConfig:
    """Spike detectors run on every metrics row (the ``detectors=`` config group)."""

    names: list[str] = field(default_factory=_default_detectors)
    """Registry names (stability/detectors); [] = none."""
    params: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments per detector name, e.g. {loss_spike: {window: 64}}."""


@dataclass
class ActionsConfig:
    """What the run does about detector events."""

    on_spike: str = "alert"
    """log | alert | skip_step | rollback | stop, for loss and grad-norm spikes."""
    on_nonfinite: str = "stop"
    """log | alert | skip_step | rollback | stop, for NaN/Inf loss or gradients."""
    on_leading: str = "alert"
    """log | alert, for leading signs (attention-logit growth, logsumexp drift, ...)."""
    rollback_skip_batches: int = 50
    """Global batches skipped after a rollback (PaLM skipped 200-500)."""
    rollback_margin_steps: int = 5
    """Roll back to a checkpoint at least this many steps before the event."""
    max_rollbacks: int = 3
    """After this many rollbacks a further one stops the run instead."""
    skip_zscore: float = 6.0
    """skip_step: skip when loss or grad norm exceeds mean + z * std of the recent window
    (OLMo-core's SkipStepOptimizer rule, decided on the device)."""
    skip_window: int = 128
    """skip_step: steps of history behind the z-score (at least 10 are needed to skip)."""


@dataclass
class FaultConfig:
    """Fault injection for tests and demos."""

    at_step: int | None = None
    """First step of the fault; None = off."""
    kind: str = "lr_spike"
    """lr_spike (LR x magnitude) | bad_batch (random tokens) | nan (NaN loss)."""
    magnitude: float = 100.0
    """LR multiplier for lr_spike."""
    duration: int = 1
    """Steps the fault lasts."""


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl."""

    console: bool = True
    """Print a progress line."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    """One training run."""

    recipe: str = "llama2"
    """Name of the recipe the values came from (informational; set by conf/recipe/*)."""
    size: str = "tiny"
    """Name of the size preset (informational; set by conf/size/*)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    monitors: MonitorConfig = field(default_factory=MonitorConfig)
    detectors: DetectorsConfig = field(default_factory=DetectorsConfig)
    actions: ActionsConfig = field(default_factory=ActionsConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


def register_configs() -> None:
    """Register the schema (conf/config.yaml extends it) and our resolvers."""
    ConfigStore.instance().store(name="stability_schema", node=Config)
    if not OmegaConf.has_resolver("steps_fraction"):
        OmegaConf.register_new_resolver("steps_fraction", steps_fraction)


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(*overrides: str) -> Config:
    """The typed config that ``python -m stability.train OVERRIDES`` would run (no Hydra run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        node = hydra_compose("config", overrides=list(overrides))
    return OmegaConf.to_object(node)


def ffn_hidden_size(model: ModelConfig) -> int:
    """The MLP width the model is built with."""
    if model.ffn_hidden_size is not None:
        return model.ffn_hidden_size
    if model.activation == "swiglu":
        return 256 * math.ceil(8 * model.hidden_size / 3 / 256)
    return 4 * model.hidden_size


def steps_fraction(steps: int, fraction: float) -> int:
    """``${steps_fraction:N,f}`` in YAML: round(f * N), e.g. warmup as a share of the run."""
    return round(float(fraction) * int(steps))


def resolve_device_type(device: str) -> str:
    """``trainer.device`` as it will run: auto is cuda when a GPU is visible."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str, device: Any) -> str:
    """``trainer.precision`` as it will run on ``device`` (a torch.device or its type name)."""
    device_type = getattr(device, "type", device)
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def _validate_device(cfg: Config) -> None:
    """What the device allows: bf16, megatron's distributed optimizer and the fused attention
    backends need a GPU (and the backend's package)."""
    t, m = cfg.trainer, cfg.model
    device = resolve_device_type(t.device)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.device", t.device, "auto or cpu (no CUDA device visible)")
    if device == "cpu" and resolve_precision(t.precision, device) == "bf16":
        raise ConfigError("trainer.precision", t.precision,
                          "fp32 or auto on the CPU (bf16 mixed precision needs a GPU)")
    if device == "cpu" and cfg.optim.distributed:
        raise ConfigError("optim.distributed", True,
                          "false on the CPU (megatron's distributed optimizer needs a GPU)")
    if device == "cuda" and not cfg.optim.embedding_weight_decay:
        raise ConfigError("optim.embedding_weight_decay", False,
                          "true on GPU (megatron's optimizer decays the embedding)")
    if m.attention_backend in ("te", "flash"):
        from stability.model.backends import backend_available

        if device == "cpu" or not backend_available(m.attention_backend):
            package = "transformer-engine" if m.attention_backend == "te" else "flash-attn"
            raise ConfigError("model.attention_backend", m.attention_backend,
                              f"auto, sdpa or local ({m.attention_backend} needs a GPU and "
                              f"{package})")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, "one of " + ", ".join(allowed))


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(key, value, ">= 0" if zero_ok else "> 0")


def _divisible(key: str, value: int, by_key: str, by: int) -> None:
    if value % by:
        raise ConfigError(key, value, f"a multiple of {by_key}={by}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Check every value a run depends on; raise ConfigError on the first bad one."""
    m, o, t, p = cfg.model, cfg.optim, cfg.trainer, cfg.parallel
    _one_of("model.norm_type", m.norm_type, NORM_TYPES)
    _one_of("model.norm_position", m.norm_position, NORM_POSITIONS)
    _one_of("model.position_embedding", m.position_embedding, POSITION_EMBEDDINGS)
    _one_of("model.activation", m.activation, ACTIVATIONS)
    _one_of("model.attention_backend", m.attention_backend, ATTENTION_BACKENDS)
    _one_of("optim.decay_style", o.decay_style, DECAY_STYLES)
    _one_of("trainer.device", t.device, DEVICES)
    _one_of("trainer.precision", t.precision, PRECISIONS)
    _one_of("logger.wandb.mode", cfg.logger.wandb.mode, WANDB_MODES)

    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        _positive(f"model.{key}", getattr(m, key))
    _divisible("model.hidden_size", m.hidden_size, "model.num_attention_heads",
               m.num_attention_heads)
    groups = m.num_query_groups or m.num_attention_heads
    _positive("model.num_query_groups", groups)
    _divisible("model.num_attention_heads", m.num_attention_heads, "model.num_query_groups",
               groups)
    if m.ffn_hidden_size is not None:
        _positive("model.ffn_hidden_size", m.ffn_hidden_size)
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.init_std", m.init_std)
    if m.embedding_init_std is not None:
        _positive("model.embedding_init_std", m.embedding_init_std)
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, key) < 1.0:
            raise ConfigError(f"model.{key}", getattr(m, key), "in [0, 1)")

    _positive("loss.z_loss", cfg.loss.z_loss, zero_ok=True)

    _positive("optim.lr", o.lr)
    _positive("optim.min_lr", o.min_lr, zero_ok=True)
    if o.min_lr > o.lr:
        raise ConfigError("optim.min_lr", o.min_lr, f"at most optim.lr={o.lr}")
    _positive("optim.eps", o.eps)
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"optim.{key}", getattr(o, key), "in [0, 1)")
    _positive("optim.weight_decay", o.weight_decay, zero_ok=True)
    _positive("optim.clip_grad", o.clip_grad, zero_ok=True)
    _positive("optim.warmup_steps", o.warmup_steps, zero_ok=True)
    if not 0.0 < o.wsd_decay_fraction <= 1.0:
        raise ConfigError("optim.wsd_decay_fraction", o.wsd_decay_fraction, "in (0, 1]")

    _positive("trainer.train_steps", t.train_steps)
    if o.warmup_steps >= t.train_steps:
        raise ConfigError("optim.warmup_steps", o.warmup_steps,
                          f"fewer than trainer.train_steps={t.train_steps}")
    if o.decay_steps is not None and not o.warmup_steps < o.decay_steps:
        raise ConfigError("optim.decay_steps", o.decay_steps, "more than the warmup steps")
    _positive("data.seq_length", cfg.data.seq_length)
    _positive("trainer.micro_batch_size", t.micro_batch_size)
    _positive("trainer.global_batch_size", t.global_batch_size)
    _positive("trainer.log_interval", t.log_interval)
    if t.threads is not None:
        _positive("trainer.threads", t.threads)

    _positive("parallel.tensor", p.tensor)
    _positive("parallel.pipeline", p.pipeline)
    _divisible("model.num_attention_heads", m.num_attention_heads, "parallel.tensor", p.tensor)
    _divisible("model.num_query_groups", groups, "parallel.tensor", p.tensor)
    _divisible("model.num_layers", m.num_layers, "parallel.pipeline", p.pipeline)
    if p.virtual_pipeline is not None:
        _positive("parallel.virtual_pipeline", p.virtual_pipeline)
        if p.pipeline < 2:
            raise ConfigError("parallel.virtual_pipeline", p.virtual_pipeline,
                              "null unless parallel.pipeline >= 2")
        _divisible("model.num_layers", m.num_layers, "parallel.pipeline * virtual_pipeline",
                   p.pipeline * p.virtual_pipeline)
    _divisible("world size", world_size, "parallel.tensor * parallel.pipeline",
               p.tensor * p.pipeline)
    dp = world_size // (p.tensor * p.pipeline)
    _divisible("trainer.global_batch_size", t.global_batch_size,
               "trainer.micro_batch_size * data-parallel size", t.micro_batch_size * dp)
    if p.virtual_pipeline is not None:
        # The interleaved schedule runs micro batches in groups of parallel.pipeline.
        _divisible("trainer.global_batch_size", t.global_batch_size,
                   "trainer.micro_batch_size * data-parallel size * parallel.pipeline",
                   t.micro_batch_size * dp * p.pipeline)

    _positive("monitors.interval", cfg.monitors.interval)
    _positive("monitors.attention_interval", cfg.monitors.attention_interval, zero_ok=True)
    _positive("monitors.update_interval", cfg.monitors.update_interval, zero_ok=True)
    if not 0.0 < cfg.monitors.update_rows_fraction <= 1.0:
        raise ConfigError("monitors.update_rows_fraction", cfg.monitors.update_rows_fraction,
                          "in (0, 1]")
    a = cfg.actions
    _one_of("actions.on_spike", a.on_spike, ACTIONS)
    _one_of("actions.on_nonfinite", a.on_nonfinite, ACTIONS)
    _one_of("actions.on_leading", a.on_leading, ("log", "alert"))
    _positive("actions.rollback_skip_batches", a.rollback_skip_batches, zero_ok=True)
    _positive("actions.rollback_margin_steps", a.rollback_margin_steps, zero_ok=True)
    _positive("actions.max_rollbacks", a.max_rollbacks, zero_ok=True)
    _positive("actions.skip_zscore", a.skip_zscore)
    if a.skip_window < 10:
        raise ConfigError("actions.skip_window", a.skip_window, ">= 10")
    if "rollback" in (a.on_spike, a.on_nonfinite) and cfg.checkpoint.interval == 0:
        raise ConfigError("checkpoint.interval", 0, "> 0 when an action is rollback")
    from stability.detectors import build_detectors

    build_detectors(cfg.detectors.names, cfg.detectors.params)  # ConfigError on a bad name
    f = cfg.fault
    _one_of("fault.kind", f.kind, FAULT_KINDS)
    if f.at_step is not None:
        _positive("fault.at_step", f.at_step)
        _positive("fault.duration", f.duration)
        _positive("fault.magnitude", f.magnitude)

    _validate_device(cfg)

    _positive("checkpoint.interval", cfg.checkpoint.interval, zero_ok=True)
    _one_of("checkpoint.resume", cfg.checkpoint.resume, ("auto", "never"))
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
