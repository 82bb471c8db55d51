"""Train a megatron-core GPT model from a Hydra config: ``python -m stability.train [overrides]``.

``run`` is one run from start to end: check the config (and the machine, and the data files)
before any work, take the run directory's lock, leave a finished run alone, resume from the
newest intact checkpoint, train (``stability/trainer.py``), write summary.json.

Exit status: 0 when the run ends by itself, whatever the outcome (completed, diverged, stopped
by a policy, preempted: summary.json says which), also when it had already finished; 2 for bad
input or a run directory that does not allow the run (one line on stderr, nothing touched); any
other failure is a crash: non-zero, with ``status: crashed`` in summary.json where it can still
be written.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

import stability  # noqa: F401  (quiets megatron-core's import warnings)
from stability import resume
from stability.callbacks import Callback
from stability.config import Config, from_node, register_configs, to_dict
from stability.errors import ConfigError, RunError
from stability.runfiles import RunFiles, RunLock, RunLocked, write_json

log = logging.getLogger("stability.train")  # also when run as __main__


def default_callbacks(cfg: Config, run_dir: Path, is_main: bool,
                      preemption: Any = None) -> list[Callback]:
    """Fault injection, monitors, detectors and actions, preemption on every rank; the files,
    console and W&B on rank 0. In this order: producers of statistics and events before the
    sinks that write them."""
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
        if cfg.logger.wandb.mode != "disabled":
            from stability.sinks.wandb import WandbSink  # imports wandb only when it is used

            callbacks.append(WandbSink(cfg.logger.wandb, run_dir, to_dict(cfg)))
    return callbacks


def run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Train one run into ``run_dir`` (or leave a finished one alone); its summary.

    Raises:
        ConfigError: A bad config value (before any work).
        RunError: The run directory does not allow the run (nothing is touched).
    """
    from stability import parallel
    from stability.checkpoint import candidates
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
        return _train(cfg, files, runtime, is_main)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, files: RunFiles, runtime: Any, is_main: bool) -> dict[str, Any]:
    from stability import parallel
    from stability.preemption import Preemption
    from stability.trainer import Trainer

    preemption = Preemption().install()
    trainer = None
    try:
        trainer = Trainer(cfg, files.root, default_callbacks(cfg, files.root, is_main,
                                                             preemption), runtime=runtime)
        loaded = trainer.start(resume=cfg.checkpoint.resume == "auto")
        if is_main:
            resume.record(files, cfg, trainer.state.step,
                          loaded.config if loaded is not None else None)
        summary = trainer.fit()
        if is_main:
            write_json(files.summary, summary)
    except (ConfigError, RunError):
        preemption.uninstall()
        raise
    except BaseException as error:
        preemption.uninstall()
        if is_main:
            steps = trainer.state.step if trainer is not None else None
            write_json(files.summary, {"status": "crashed", "steps": steps,
                                       "error": f"{type(error).__name__}: {error}"})
        raise
    finally:
        parallel.shutdown()
    if summary["status"] == "preempted":
        preemption.forward()  # under submitit: requeue this job; it resumes from the checkpoint
    preemption.uninstall()
    return summary


register_configs()


def _hydra_main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    config_dir = os.environ.get("STABILITY_CONF", str(Path(__file__).parent.parent / "conf"))

    @hydra.main(config_path=config_dir, config_name="config", version_base="1.3")
    def main(node: DictConfig) -> float:
        try:
            cfg = from_node(node)
            summary = run(cfg, Path(HydraConfig.get().runtime.output_dir))
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            sys.exit(2)
        except RunError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        return summary["final_loss"]

    main()


if __name__ == "__main__":
    _hydra_main()
