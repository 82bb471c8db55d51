"""Set-up cost of a run: process start to its first step, cold and warm, and in one process.

``python -m benchmarks.setup [--repeats 3] [--drop-caches] [OVERRIDE ...]`` (default overrides:
``size=study``) measures, for a one-step run of ``python -m stability.train`` as a user starts it:

- **imports**: a fresh interpreter importing what a run imports (torch, megatron-core, the
  trainer), files in the page cache;
- **process start -> first step**: from spawning the command to its first row in
  ``metrics.jsonl`` (written when step 1 has finished), warm (the page cache holds the
  libraries: every run after the first) and, with ``--drop-caches`` (root: writes
  ``/proc/sys/vm/drop_caches``), cold: after the kernel dropped its page cache, as on a node
  that has not run anything yet;
- **a second run in the same process** (what a Hydra multirun worker does): ``stability.train.
  run`` twice in one interpreter after the imports, the wall time of each one-step run (set-up,
  the step, the summary).

Medians over ``--repeats``. Absolute seconds: this is context for the issue's "first step within
5 s of process start", not a ratio, so run it on an idle machine.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODULES = ("torch", "megatron.core", "stability.train", "stability.trainer")
"""What a run imports (torch and megatron-core through the trainer)."""
IMPORTS = f"import {', '.join(MODULES)}"
DEFAULT = ["size=study"]
ONE_STEP = ["trainer.train_steps=1", "trainer.eval_interval=null", "trainer.device=cpu",
            "checkpoint.interval=0", "checkpoint.save_final=false", "logger.console=false"]


def import_seconds() -> float:
    """Wall seconds for a fresh interpreter to import what a run imports."""
    code = f"import time; t = time.perf_counter(); {IMPORTS}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def first_step_seconds(overrides: list[str], run_dir: Path, timeout: float = 300.0) -> float:
    """Seconds from spawning ``python -m stability.train`` to its first metrics row."""
    metrics = run_dir / "metrics.jsonl"
    cmd = [sys.executable, "-m", "stability.train", *overrides, *ONE_STEP,
           f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while first is None and time.perf_counter() - start < timeout:
        if metrics.is_file() and metrics.read_text().count("\n") >= 1:
            first = time.perf_counter() - start
        elif proc.poll() is not None:
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=timeout)
    if first is None:
        raise RuntimeError(f"no metrics row from {' '.join(cmd)}: {err.strip()[-500:]}")
    return first


def drop_caches() -> bool:
    """Ask the kernel to drop its page cache (root only); whether it did."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def in_process_runs(overrides: list[str], root: Path, runs: int = 2) -> list[float]:
    """Wall seconds of ``runs`` one-step runs in this process, after the imports."""
    for name in MODULES:  # the imports are done before the first run is timed
        importlib.import_module(name)
    from stability.config import compose
    from stability.train import run

    out = []
    for i in range(runs):
        cfg = compose(*overrides, *ONE_STEP)
        start = time.perf_counter()
        run(cfg, root / f"in-process-{i}")
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.setup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", default=DEFAULT, help="config overrides of the run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--drop-caches", action="store_true",
                   help="also measure a cold start (root: drops the kernel's page cache)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = []
        if a.drop_caches:
            if drop_caches():
                rows.append(("process start -> first step, cold (page cache dropped)",
                             [first_step_seconds(a.overrides, root / "cold")]))
            else:
                print("--drop-caches: not allowed here (needs root); no cold number")
        first_step_seconds(a.overrides, root / "warm-up")  # the page cache holds the libraries
        rows.append(("imports in a fresh interpreter",
                     [import_seconds() for _ in range(a.repeats)]))
        rows.append(("process start -> first step, warm",
                     [first_step_seconds(a.overrides, root / f"warm-{i}")
                      for i in range(a.repeats)]))
        first, second = zip(*(in_process_runs(a.overrides, root / f"proc-{i}")
                              for i in range(a.repeats)), strict=True)
        rows.append(("one-step run, first in its process (imports done)", list(first)))
        rows.append(("one-step run, second in the same process", list(second)))
    print(f"one-step runs of `python -m stability.train {' '.join(a.overrides)}`")
    for name, values in rows:
        print(f"{name:56s} {statistics.median(values):6.2f} s   "
              f"({', '.join(f'{v:.2f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
