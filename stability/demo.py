"""The README's demo: both recipes on the sample corpus, side by side, on CPU.

``python -m stability.demo [--steps N] [--size tiny] [--out runs/demo]`` trains ``recipe=gpt``
and ``recipe=llama2`` as two parallel processes (one thread each) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from stability.runfiles import read_jsonl

RECIPES = ("gpt", "llama2")


def train_command(recipe: str, args: argparse.Namespace, run_dir: Path) -> list[str]:
    lr = [] if args.lr is None else [f"optim.lr={args.lr}"]
    return [sys.executable, "-m", "stability.train", f"recipe={recipe}", f"size={args.size}",
            f"trainer.train_steps={args.steps}", *lr, "trainer.threads=1",
            "checkpoint.interval=0", f"hydra.run.dir={run_dir}", *args.overrides]


def table(runs: dict[str, Path]) -> str:
    """One row per recipe: parameters, loss at start and end, grad norm, speed."""
    header = f"{'recipe':<8} {'params':>9} {'loss@1':>7} {'loss@end':>8} {'min loss':>8} " \
             f"{'max grad':>8} {'tok/s':>7} {'status':>9}"
    lines = [header, "-" * len(header)]
    for recipe, run_dir in runs.items():
        rows = read_jsonl(run_dir / "metrics.jsonl")
        summary = json.loads((run_dir / "summary.json").read_text())
        losses = [r["loss"] for r in rows]
        tps = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
        lines.append(
            f"{recipe:<8} {summary['parameters'] / 1e6:>8.2f}M {losses[0]:>7.3f} "
            f"{summary['final_loss']:>8.3f} {min(losses):>8.3f} "
            f"{max(r['grad_norm'] for r in rows):>8.3g} {tps:>7,.0f} {summary['status']:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak LR for both recipes (default: the size preset's CPU-scale "
                             "LR, 3e-3; the published LRs are for 170B models and a "
                             "1,500-1,700-sequence batch)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = parser.parse_args(argv)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {recipe: args.out / recipe for recipe in RECIPES}
    start = time.time()
    procs = {}
    for recipe, run_dir in runs.items():
        run_dir.mkdir(parents=True, exist_ok=True)
        log = (run_dir / "console.log").open("w")  # train.log is Hydra's (the same lines)
        print(f"training recipe={recipe} -> {run_dir} (log: {run_dir / 'train.log'})")
        procs[recipe] = subprocess.Popen(train_command(recipe, args, run_dir), stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
    failed = [recipe for recipe, proc in procs.items() if proc.wait() != 0]
    if failed:
        for recipe in failed:
            print((runs[recipe] / "console.log").read_text()[-3000:], file=sys.stderr)
        print(f"demo failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    lr = "the preset's LR" if args.lr is None else f"LR {args.lr:g}"
    print(f"\nboth recipes, {args.steps} steps at {lr}, size={args.size}, "
          f"in {time.time() - start:.0f} s\n")
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
