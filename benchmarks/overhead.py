"""Step-time cost of monitors and detectors at their default cadence, side by side.

``python -m benchmarks.overhead [--size small] [--threads 2] [--steps 10] [--rounds 8]``

Two trainers of the same model in one process, one with the monitors and the default detector
set (what every run has), one without; they alternate in rounds of ``--steps`` steps so that the
machine's noise falls on both alike. A round is a whole monitor interval (the full passes every
``monitors.interval`` steps count), its time is the mean step time of the round, and the
overhead is the ratio of the medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import stability  # noqa: F401
from stability import parallel
from stability.config import compose
from stability.runtime import Runtime
from stability.trainer import Trainer
from stability.watch.actions import SpikeWatch
from stability.watch.monitors import Monitors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--recipe", default="llama2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    cfg = compose(f"recipe={args.recipe}", f"size={args.size}", "optim.lr=1e-3",
                  f"trainer.train_steps={args.rounds * args.steps + 10}",
                  "checkpoint.interval=0", "checkpoint.save_final=false",
                  f"trainer.threads={args.threads}", "trainer.device=cpu")
    runtime = Runtime.resolve(cfg)
    runtime.apply()
    topology = parallel.init(runtime.device, 1, 1)
    tmp = Path(tempfile.mkdtemp())
    watched = Trainer(cfg, tmp / "watched", [
        Monitors(cfg.monitors, cfg.model.num_layers, cfg.trainer.seed),
        SpikeWatch(cfg.detectors, cfg.actions),
    ], runtime=runtime, topology=topology)
    plain = Trainer(cfg, tmp / "plain", [], runtime=runtime, topology=topology)
    for trainer in (watched, plain):
        trainer.start(resume=False)
        for _ in range(2):  # warm-up
            trainer.train_step()
            trainer.finish_step()
    times: dict[str, list[float]] = {"with monitors+detectors": [], "without": []}
    for _ in range(args.rounds):
        for name, trainer in (("with monitors+detectors", watched), ("without", plain)):
            start = time.perf_counter()
            for _ in range(args.steps):  # a step and its flush (log_interval=1)
                trainer.train_step()
                trainer.finish_step()
            times[name].append((time.perf_counter() - start) / args.steps)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"size={args.size} recipe={args.recipe} threads={args.threads} "
          f"steps={args.rounds}x{args.steps} each, alternating")
    for name, median in medians.items():
        print(f"{name:<26} median over rounds {median * 1e3:8.1f} ms/step")
    overhead = medians["with monitors+detectors"] / medians["without"] - 1
    print(f"overhead: {overhead:+.2%}  (detectors: {', '.join(cfg.detectors.names)}; "
          f"monitor interval {cfg.monitors.interval}, attention {cfg.monitors.attention_interval})")
    parallel.shutdown()


if __name__ == "__main__":
    main()
