"""Typed configuration: the schema of every run, registered in Hydra's ConfigStore.

The schema is a tree of dataclasses; YAML files under ``stability/conf/`` only set values. Each
section lives next to the component it configures, in a module that imports no torch (so that
the command line, ``--help`` and tab completion stay fast), and checks its own values in
``validate()``:

============  =====================================  ==========================================
section       dataclass                              component
============  =====================================  ==========================================
model, loss   ``stability/model/config.py``          ``stability/model/`` (build, layers, loss)
optim         ``stability/optim/config.py``          ``stability/optim/adamw.py``
data          ``stability/data/config.py``           ``stability/data/``
monitors,     ``stability/watch/config.py``          ``stability/watch/`` (monitors, actions,
detectors,                                           fault) and ``stability/detectors/``
actions,
fault
logger        ``stability/sinks/config.py``          ``stability/sinks/``
trainer,      here                                   the loop itself: ``trainer.py``,
parallel,                                            ``parallel.py``, ``checkpoint.py``
checkpoint
============  =====================================  ==========================================

``Config.validate`` runs every section's checks and then the rules that span sections, once,
before any work starts; each raises :class:`ConfigError` naming the key, the bad value and what
is allowed. What depends on the machine (device, precision, attention backend) is decided and
checked by ``stability.runtime.Runtime.resolve``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from stability import cli_help
from stability.cli_help import section_of
from stability.data.config import DataConfig
from stability.errors import ConfigError, divisible, one_of, positive
from stability.model.config import LossConfig, ModelConfig
from stability.optim.config import OptimConfig
from stability.sinks.config import LoggerConfig
from stability.watch.config import ActionsConfig, DetectorsConfig, FaultConfig, MonitorConfig

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
RESUME = ("auto", "never")


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
    eval_interval: int | None = 0
    """Steps between held-out evaluations (``eval_loss``, stability/evaluate.py); 0 = at the
    end of the run only; null = never."""
    eval_batches: int | None = None
    """Global batches (trainer.global_batch_size sequences) of the held-out split per
    evaluation; null = all its whole global batches. The same sequences in any parallel
    layout."""
    log_interval: int | None = None
    """Steps between metric rows; None = every step on CPU, every 10 steps on GPU (a flush is
    the loop's one host sync: detectors act at flushes, a skip in the same step)."""
    compile: bool = False
    """Compile the model's forward (and its backward) with ``torch.compile`` (inductor) in
    place (``nn.Module.compile``: parameters and state-dict keys stay the same; losses within
    1e-5 of an eager run). The first step pays the compile (17-36 s for size=small or study on
    a CPU, cold cache; again after a change of thread count; the first evaluation a few seconds
    more) and later steps run fused kernels for the element-wise work between the matmuls
    (norms, RoPE, SwiGLU, residual adds): 6-15% faster CPU steps at size=small and study, so
    it pays after about 900-1,800 steps (``benchmarks/throughput.py --compile``). One tensor-
    and pipeline-parallel rank only."""

    def validate(self) -> None:
        one_of("trainer.device", self.device, DEVICES)
        one_of("trainer.precision", self.precision, PRECISIONS)
        positive("trainer.train_steps", self.train_steps)
        positive("trainer.micro_batch_size", self.micro_batch_size)
        positive("trainer.global_batch_size", self.global_batch_size)
        if self.log_interval is not None:
            positive("trainer.log_interval", self.log_interval)
        if self.eval_interval is not None:
            positive("trainer.eval_interval", self.eval_interval, zero_ok=True)
        if self.eval_batches is not None:
            positive("trainer.eval_batches", self.eval_batches)
        if self.threads is not None:
            positive("trainer.threads", self.threads)


@dataclass
class ParallelConfig:
    """Model parallelism; data parallelism is what is left of the world size."""

    tensor: int = 1
    """Tensor-parallel size."""
    pipeline: int = 1
    """Pipeline-parallel size."""
    virtual_pipeline: int | None = None
    """Virtual stages per pipeline rank (interleaved schedule); None = off."""

    def validate(self) -> None:
        positive("parallel.tensor", self.tensor)
        positive("parallel.pipeline", self.pipeline)
        if self.virtual_pipeline is not None:
            positive("parallel.virtual_pipeline", self.virtual_pipeline)
            if self.pipeline < 2:
                raise ConfigError("parallel.virtual_pipeline", self.virtual_pipeline,
                                  "null unless parallel.pipeline >= 2")


@dataclass
class CheckpointConfig:
    """Checkpoints under <run_dir>/checkpoints."""

    interval: int = 100
    """Steps between checkpoints; 0 = only at the end."""
    resume: str = "auto"
    """auto (continue the run in this directory from its latest intact checkpoint, if any) |
    never (start from scratch; refused when the directory already holds a run)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are removed (never one newer than the latest)."""
    save_final: bool = True
    """Write a checkpoint at the end of training."""

    def validate(self) -> None:
        positive("checkpoint.interval", self.interval, zero_ok=True)
        one_of("checkpoint.resume", self.resume, RESUME)
        positive("checkpoint.keep_last", self.keep_last)


@dataclass
class Config:
    """One training run."""

    recipe: str = "llama2"
    """Name of the recipe the values came from (informational; set by stability/conf/recipe/*)."""
    size: str = "tiny"
    """Name of the size preset (informational; set by stability/conf/size/*)."""
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

    def validate(self, world_size: int = 1) -> None:
        """Every section's checks, then the rules across sections; the first bad value raises
        ConfigError. Reads no file and needs no torch."""
        for section in (self.model, self.loss, self.optim, self.data, self.trainer,
                        self.parallel, self.checkpoint, self.logger, self.monitors,
                        self.detectors, self.actions, self.fault):
            section.validate()
        m, o, t, p = self.model, self.optim, self.trainer, self.parallel
        if o.warmup_steps >= t.train_steps:
            raise ConfigError("optim.warmup_steps", o.warmup_steps,
                              f"fewer than trainer.train_steps={t.train_steps}")
        divisible("model.num_attention_heads", m.num_attention_heads, "parallel.tensor",
                  p.tensor)
        divisible("model.num_query_groups", m.query_groups, "parallel.tensor", p.tensor)
        divisible("model.num_layers", m.num_layers, "parallel.pipeline", p.pipeline)
        if p.virtual_pipeline is not None:
            divisible("model.num_layers", m.num_layers, "parallel.pipeline * virtual_pipeline",
                      p.pipeline * p.virtual_pipeline)
        divisible("world size", world_size, "parallel.tensor * parallel.pipeline",
                  p.tensor * p.pipeline)
        dp = world_size // (p.tensor * p.pipeline)
        divisible("trainer.global_batch_size", t.global_batch_size,
                  "trainer.micro_batch_size * data-parallel size", t.micro_batch_size * dp)
        if p.virtual_pipeline is not None:
            # The interleaved schedule runs micro batches in groups of parallel.pipeline.
            divisible("trainer.global_batch_size", t.global_batch_size,
                      "trainer.micro_batch_size * data-parallel size * parallel.pipeline",
                      t.micro_batch_size * dp * p.pipeline)
        if t.compile and (p.tensor > 1 or p.pipeline > 1):
            raise ConfigError("trainer.compile", True,
                              "false under tensor or pipeline parallelism (parallel.tensor and "
                              "parallel.pipeline must be 1)")
        if self.actions.rolls_back and self.checkpoint.interval == 0:
            raise ConfigError("checkpoint.interval", 0, "> 0 when an action is rollback")


def validate(cfg: Config, world_size: int = 1) -> None:
    """``cfg.validate(world_size)``."""
    cfg.validate(world_size)


# ---------------------------------------------------------------------- Hydra
CONF_MODULE = "stability.conf"
"""The config tree as a Python package: Hydra's ``pkg://stability.conf`` (found in a wheel too)."""
CONF_DIR = Path(__file__).resolve().parent / "conf"
"""The same tree on disk (``stability/conf/``); its named studies are ``CONF_DIR / "sweep"``."""


def register_configs() -> None:
    """Register the schema (stability/conf/config.yaml extends it) and our resolvers."""
    ConfigStore.instance().store(name="stability_schema", node=Config)
    if not OmegaConf.has_resolver("steps_fraction"):
        OmegaConf.register_new_resolver("steps_fraction", steps_fraction)
    if not OmegaConf.has_resolver("times"):
        OmegaConf.register_new_resolver("times", times)
    cli_help.register(Config)


def times(value: float, factor: float) -> float:
    """``${times:x,f}`` in YAML: x * f, e.g. the minimum LR as a share of the peak,
    ``optim.min_lr: ${times:${optim.lr},0.1}``."""
    return float(value) * float(factor)


def steps_fraction(steps: int, fraction: float) -> int:
    """``${steps_fraction:N,f}`` in YAML: round(f * N), e.g. warmup as a share of the run."""
    return round(float(fraction) * int(steps))


def from_node(node: DictConfig | Config) -> Config:
    """The typed config of Hydra's composed node; a key the schema does not know (``+x.y=1``
    adds one past Hydra's struct check) raises ConfigError."""
    if isinstance(node, Config):
        return node
    _refuse_unknown_keys(OmegaConf.to_container(node, resolve=False), Config, "")
    return OmegaConf.to_object(node)


def _refuse_unknown_keys(values: Any, schema: type, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        if key not in fields:
            allowed = ", ".join(prefix + name for name in fields)
            raise ConfigError(prefix + str(key), value, f"a key of the schema ({allowed})")
        section = section_of(fields[key])
        if section is not None and isinstance(value, dict):
            _refuse_unknown_keys(value, section, f"{prefix}{key}.")


def compose(*overrides: str) -> Config:
    """The typed config that ``python -m stability.train OVERRIDES`` would run (no Hydra run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_configs()
    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        node = hydra_compose("config", overrides=list(overrides))
    return from_node(node)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts (what config.yaml holds)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """config.yaml's text."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
