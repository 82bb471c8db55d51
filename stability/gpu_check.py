"""The GPU check: ``scripts/gpu-check`` (docs/gpu.md). One GPU, no network, under 8 minutes.

1. Parity: a tiny Llama2 model from the same initial weights (drawn on the CPU) trains a few
   steps on the fp32 CPU path, on the GPU in fp32 and on the GPU in bf16; prints the losses and
   the largest differences (fp32 GPU should agree to ~1e-4 relative, bf16 to a few 1e-2).
2. Throughput: ``size=350m recipe=llama2`` in bf16 for ``--steps`` steps; prints tokens/s, model
   FLOP/s, MFU against the GPU's dense bf16 peak, and peak memory.

Each run is a ``python -m stability.train`` subprocess with its own run directory (under
``--out``); the numbers are read back from metrics.jsonl and summary.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from stability.config import compose
from stability.errors import ConfigError
from stability.runfiles import RunFiles, read_jsonl
from stability.runtime import Runtime
from stability.throughput import gpu_peak_flops

QUIET = ["logger.console=false", "checkpoint.interval=0", "checkpoint.save_final=false"]
PARITY = ["size=tiny", "recipe=llama2", "model.cpu_initialization=true", "optim.lr=3e-3",
          "trainer.micro_batch_size=4"]


def train(run_dir: Path, overrides: list[str], env: dict[str, str] | None = None,
          timeout: int = 420) -> tuple[list[dict], dict]:
    """One run; its metrics rows and summary."""
    command = [sys.executable, "-m", "stability.train", *QUIET, *overrides,
               f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"run failed: {' '.join(overrides)}")
    files = RunFiles(run_dir)
    rows, summary = read_jsonl(files.metrics), files.read_summary()
    print(f"  ({time.perf_counter() - start:.0f} s) {' '.join(overrides)}")
    return rows, summary


def parity(out: Path, steps: int) -> None:
    print(f"== parity: tiny llama2, {steps} steps from the same CPU-drawn weights")
    common = [*PARITY, f"trainer.train_steps={steps}"]
    cpu, _ = train(out / "parity-cpu", [*common, "trainer.device=cpu"],
                   env={"CUDA_VISIBLE_DEVICES": ""})
    fp32, _ = train(out / "parity-gpu-fp32", [*common, "trainer.device=cuda",
                                              "trainer.precision=fp32",
                                              "model.attention_backend=sdpa"])
    bf16, _ = train(out / "parity-gpu-bf16", [*common, "trainer.device=cuda",
                                              "trainer.precision=bf16"])
    print(f"  {'step':>4} {'cpu fp32':>10} {'gpu fp32':>10} {'gpu bf16':>10}")
    for a, b, c in zip(cpu, fp32, bf16, strict=True):
        print(f"  {a['step']:>4} {a['loss']:>10.5f} {b['loss']:>10.5f} {c['loss']:>10.5f}")
    fp32_rel = max(abs(b["loss"] - a["loss"]) / abs(a["loss"]) for a, b in zip(cpu, fp32))
    bf16_abs = max(abs(c["loss"] - a["loss"]) for a, c in zip(cpu, bf16))
    print(f"  max |gpu fp32 - cpu| / cpu = {fp32_rel:.2e} ({'ok' if fp32_rel < 1e-4 else 'HIGH'})"
          f"; max |gpu bf16 - cpu| = {bf16_abs:.3f} ({'ok' if bf16_abs < 5e-2 else 'HIGH'})")


def throughput(out: Path, steps: int, micro_batch: int, global_batch: int) -> None:
    print(f"== throughput: size=350m recipe=llama2, bf16, {steps} steps, "
          f"micro batch {micro_batch}, global batch {global_batch}")
    rows, summary = train(out / "350m", [
        "size=350m", "recipe=llama2", "trainer.device=cuda", "trainer.precision=bf16",
        f"trainer.train_steps={steps}", f"optim.warmup_steps={max(1, steps // 10)}",
        "optim.lr=3e-4", "optim.min_lr=3e-5", f"trainer.micro_batch_size={micro_batch}",
        f"trainer.global_batch_size={global_batch}", "trainer.log_interval=10"])
    steady = rows[len(rows) // 2:]  # the second half: compiled, warmed up, allocator settled
    tps = sum(r["tokens_per_s"] for r in steady) / len(steady)
    mfu = [r["mfu"] for r in steady if "mfu" in r]
    flops = sum(r["model_flops_per_s"] for r in steady) / len(steady)
    print(f"  loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f} ({summary['status']})")
    mfu_text = f"{sum(mfu) / len(mfu):.1%}" if mfu else "n/a (GPU not in the peak table)"
    print(f"  tokens/s {tps:,.0f} | model TFLOP/s {flops / 1e12:.1f} | MFU {mfu_text}")
    print(f"  peak memory {summary.get('peak_memory_gib', float('nan')):.1f} GiB | "
          f"run: tokens/s {summary.get('tokens_per_s', 0):,.0f}, MFU "
          f"{summary.get('mfu', float('nan')):.1%} (whole run, warm-up included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="350m steps")
    parser.add_argument("--parity-steps", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="run directories (default: tmp)")
    parser.add_argument("--skip-parity", action="store_true")
    args = parser.parse_args()
    try:
        runtime = Runtime.resolve(compose("trainer.device=cuda"))
    except ConfigError as error:
        raise SystemExit(f"gpu-check needs a CUDA GPU ({error})") from None
    name = torch.cuda.get_device_name()
    peak = gpu_peak_flops(name)
    packages = {p: importlib.util.find_spec(p) is not None
                for p in ("transformer_engine", "flash_attn", "megatron.core")}
    print(f"== {name} | torch {torch.__version__} | peak bf16 "
          f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} | "
          f"attention backend auto -> {runtime.attention_backend} | {packages}")
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    start = time.perf_counter()
    if not args.skip_parity:
        parity(out, args.parity_steps)
    throughput(out, args.steps, args.micro_batch, args.global_batch)
    print(f"== done in {time.perf_counter() - start:.0f} s; run directories under {out}")


if __name__ == "__main__":
    main()
