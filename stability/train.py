"""Train a megatron-core GPT model from a Hydra config: ``python -m stability.train [overrides]``
(also ``stability-train``).

``run`` is one run from start to end: check the config (and the machine, and the data files)
before any work, take the run directory's lock, leave a finished run alone, resume from the
newest intact checkpoint, train (``stability/trainer.py``), write summary.json. It logs a start
banner (run directory, parameters, device, attention backend, resume point) and an end line
through :mod:`logging`, so Hydra's ``train.log`` in the run directory holds them.

Exit status: 0 when the run ends by itself, whatever the outcome (completed, diverged, stopped
by a policy, preempted: summary.json says which), also when it had already finished; 2 for bad
input or a run directory that does not allow the run (one line on stderr, nothing touched); any
other failure is a crash: non-zero, with ``status: crashed`` in summary.json where it can still
be written.

The command line stays fast (``--help``, ``--cfg job``, shell completion: about a second): this
module imports torch and megatron-core only inside ``run``, after Hydra has parsed the command
line; the config schema (``stability/config.py``) imports no torch.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stability.config import CONF_MODULE, Config, from_node, register_configs, to_dict
from stability.errors import ConfigError, RunError
from stability.sinks.config import RunLabels

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from stability.callbacks import Callback

log = logging.getLogger("stability.train")  # also when run as __main__


def default_callbacks(cfg: Config, run_dir: Path, is_main: bool, preemption: Any = None,
                      labels: RunLabels | None = None) -> list[Callback]:
    """Fault injection, monitors, detectors and actions, preemption on every rank; the files,
    console and W&B on rank 0. In this order: producers of statistics and events before the
    sinks that write them. ``labels``: the W&B run's name and group from the launch."""
    from stability.preemption import PreemptionWatch
    from stability.sinks.console import ConsoleProgress
    from stability.sinks.jsonl import EventsWriter, MetricsWriter
    from stability.watch.actions import SpikeWatch
    from stability.watch.fault import FaultInjector
    from stability.watch.monitors import Monitors

    callbacks: list[Callback] = []
    if cfg.fault.at_step is not None:
        callbacks.append(FaultInjector(cfg.fault))
    if cfg.monitors.enabled:
        callbacks.append(Monitors(cfg.monitors, cfg.model.num_layers, cfg.trainer.seed))
    if cfg.detectors.names or cfg.actions.on_nonfinite in ("skip_step", "rollback", "stop"):
        callbacks.append(SpikeWatch(cfg.detectors, cfg.actions))
    if preemption is not None:
        callbacks.append(PreemptionWatch(preemption))
    if is_main:
        callbacks += [MetricsWriter(run_dir), EventsWriter(run_dir)]
        if cfg.logger.console:
            callbacks.append(ConsoleProgress(cfg.trainer.train_steps))
        if cfg.logger.wandb.resolved_mode() != "disabled":
            from stability.sinks.wandb import WandbSink  # imports wandb only when it is used

            callbacks.append(WandbSink(cfg.logger.wandb, run_dir, to_dict(cfg), labels))
    return callbacks


def run(cfg: Config, run_dir: Path, labels: RunLabels | None = None) -> dict[str, Any]:
    """Train one run into ``run_dir`` (or leave a finished one alone); its summary.

    Args:
        cfg: The run's config.
        run_dir: The run directory.
        labels: How the launch names the run for W&B (name, group); None = from the directory.

    Raises:
        ConfigError: A bad config value (before any work).
        RunError: The run directory does not allow the run (nothing is touched).
    """
    is_main = _rank_from_env() == 0
    if is_main:  # before the imports of torch and megatron-core (seconds)
        log.info("run %s: recipe=%s size=%s, %d steps", Path(run_dir).resolve(), cfg.recipe,
                 cfg.size, cfg.trainer.train_steps)
    from stability import parallel, resume
    from stability.checkpoint import candidates
    from stability.runfiles import RunFiles, RunLock, RunLocked
    from stability.runtime import Runtime

    files = RunFiles(Path(run_dir))
    launch = parallel.detect_launch()
    cfg.validate(launch.world_size)
    cfg.data.check_files()
    if cfg.model.init_from:
        from stability.hf.load import check_init_from

        check_init_from(cfg)
    runtime = Runtime.resolve(cfg)
    is_main = launch.rank == 0
    try:
        lock = RunLock(files.lock).acquire() if is_main else None
    except RunLocked as error:
        raise RunError(str(error)) from None
    try:
        resume.refuse_overwrite(files, cfg)
        stored = resume.finished(files, cfg)
        if stored is not None:
            if is_main:
                log.warning("run already %s at step %d: %s", stored["status"],
                            stored.get("steps", 0), files.root)
            return stored
        if cfg.checkpoint.resume == "auto":  # refuse a fixed key before building anything
            newest = candidates(files.checkpoints)[0]
            if newest:
                resume.check(resume.changes(resume.read_config(newest[0].config),
                                            to_dict(cfg)), newest[0].config)
        return _train(cfg, files, runtime, is_main, labels)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, files: Any, runtime: Any, is_main: bool,
           labels: RunLabels | None) -> dict[str, Any]:
    from stability import parallel, resume
    from stability.preemption import Preemption
    from stability.runfiles import write_json
    from stability.trainer import Trainer

    preemption = Preemption().install()
    trainer = None
    started, wall, cpu = time.monotonic(), time.time(), time.process_time()
    try:
        trainer = Trainer(cfg, files.root, default_callbacks(cfg, files.root, is_main,
                                                             preemption, labels),
                          runtime=runtime)
        loaded = trainer.start(resume=cfg.checkpoint.resume == "auto")
        if is_main:
            resume.record(files, cfg, trainer.state.step,
                          loaded.config if loaded is not None else None)
            for line in banner(cfg, trainer, loaded):
                log.info("%s", line)
        summary = trainer.fit()
        # This process's share of the cost (a study's core-minutes: analysis.regenerate).
        summary.update(started_at=wall, wall_seconds=time.time() - wall,
                       cpu_seconds=time.process_time() - cpu)
        if is_main:
            write_json(files.summary, summary)
            log.info("%s", end_line(summary, cfg, time.monotonic() - started, files.root))
    except (ConfigError, RunError):
        preemption.uninstall()
        raise
    except BaseException as error:
        preemption.uninstall()
        if is_main:
            steps = trainer.state.step if trainer is not None else None
            write_json(files.summary, {"status": "crashed", "steps": steps,
                                       "error": f"{type(error).__name__}: {error}"})
            log.error("crashed at step %s: %s: %s", steps, type(error).__name__, error)
        raise
    finally:
        parallel.shutdown()
    if summary["status"] == "preempted":
        preemption.forward()  # under submitit: requeue this job; it resumes from the checkpoint
    preemption.uninstall()
    return summary


def banner(cfg: Config, trainer: Any, loaded: Any) -> list[str]:
    """The start banner: what is about to train, where, on what, from which step."""
    m, t, o, rt, top = cfg.model, cfg.trainer, cfg.optim, trainer.runtime, trainer.topology
    vocab = trainer.state.vocab_size
    threads = f", {rt.threads} thread{'s' if rt.threads > 1 else ''}" if rt.threads else ""
    if loaded is None:
        start = "fresh start at step 0"
    else:
        start = f"resumed at step {trainer.state.step} from {loaded.path}"
    return [
        f"model: {cfg.recipe} recipe, {trainer.parameters / 1e6:.2f}M parameters "
        f"({m.num_layers} layers, d={m.hidden_size}, {m.num_attention_heads} heads, "
        f"vocab {vocab})",
        f"device: {rt.device_type} {rt.precision}, attention backend {rt.attention_backend}, "
        f"world {top.launch.world_size} (tp {top.tp_size}, pp {top.pp_size}, "
        f"dp {top.dp_size}){threads}",
        f"train: {t.train_steps} steps of {t.global_batch_size} x {cfg.data.seq_length} "
        f"tokens, lr {o.lr:g} (warmup {o.warmup_steps}, {o.decay_style} to {o.min_lr:g})",
        f"start: {start}",
    ]


def end_line(summary: dict[str, Any], cfg: Config, seconds: float, run_dir: Path) -> str:
    """One line at the end: status, steps, final loss, wall time, throughput, where."""
    rate = summary.get("tokens_per_s")
    speed = f", {rate:,.0f} tok/s" if rate else ""
    return (f"{summary['status']} at step {summary['steps']}/{cfg.trainer.train_steps}: "
            f"final loss {summary['final_loss']:.4f}, {seconds:.0f} s{speed}; "
            f"{Path(run_dir) / 'summary.json'}")


def _rank_from_env() -> int:
    """This process's global rank from torchrun's or SLURM's variables (the same ones as
    ``parallel.detect_launch``), read before torch is imported."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ and (key == "RANK" or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
            return int(os.environ[key])
    return 0


register_configs()


def labels_from_hydra(hydra_cfg: Any, cfg: Config) -> RunLabels:
    """The W&B run's readable name and its group, from Hydra's job: the name is the run's
    recipe, size and overrides (``gpt-tiny/optim.lr=0.001,trainer.seed=1``, what a single run's
    directory is named after; in a multirun the directory is only the job number); the group is
    the named study (``+sweep=NAME``), else a multirun's sweep directory name, else none."""
    overrides = list(hydra_cfg.overrides.task)
    study = next((o.split("=", 1)[1] for o in overrides if o.startswith("+sweep=")), None)
    mode = str(hydra_cfg.mode)
    group = study
    if group is None and mode.endswith("MULTIRUN"):
        group = Path(str(hydra_cfg.sweep.dir)).name
    name = f"{cfg.recipe}-{cfg.size}"
    if hydra_cfg.job.override_dirname:
        name += f"/{hydra_cfg.job.override_dirname}"
    return RunLabels(name=name, group=group)


def _task(node: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    try:
        cfg = from_node(node)
        hydra_cfg = HydraConfig.get()
        summary = run(cfg, Path(hydra_cfg.runtime.output_dir), labels_from_hydra(hydra_cfg, cfg))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return summary["final_loss"]


def _hydra_main() -> None:
    """The command line: ``stability-train`` and ``python -m stability.train``. The config tree
    is found in the package (``pkg://stability.conf``), from any working directory."""
    import hydra

    hydra.main(config_path=f"pkg://{CONF_MODULE}", config_name="config",
               version_base="1.3")(_task)()


main = _hydra_main


if __name__ == "__main__":
    _hydra_main()
