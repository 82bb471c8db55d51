"""The GPU check: ``scripts/gpu-check [--smoke]`` (docs/gpu.md). One GPU, no network.

Each part runs ``python -m stability.train`` as a subprocess with its own run directory (under
``--out``) and reads the numbers back from the run files; every number goes to one table on
stdout and to ``--json`` (default ``<out>/gpu-check.json``).

- environment: GPU, torch, CUDA, the packages the GPU path can use, the runtime's decisions;
- ``--smoke`` only, in about 6 minutes on an H100/H200: the GPU tests (pytest), a resume after
  kill -9 in bf16 (losses against the uninterrupted run), a rollback in bf16, and 350m
  throughput with and without the monitors and detectors;
- parity: a tiny Llama2 model from the same CPU-drawn weights on the fp32 CPU path, the GPU in
  fp32 and the GPU in bf16 (fp32 should agree to ~1e-4 relative, bf16 to a few 1e-2);
- throughput: ``size=350m recipe=llama2`` in bf16: tokens/s, model FLOP/s, MFU against the GPU's
  dense bf16 peak, peak memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from stability.config import compose
from stability.errors import ConfigError
from stability.runfiles import RunFiles, read_jsonl
from stability.runtime import Runtime
from stability.throughput import gpu_peak_flops

QUIET = ["logger.console=false", "checkpoint.interval=0", "checkpoint.save_final=false"]
TINY = ["size=tiny", "recipe=llama2", "optim.lr=3e-3", "trainer.micro_batch_size=4"]
PARITY = [*TINY, "model.cpu_initialization=true"]
REPO = Path(__file__).resolve().parent.parent


def command(run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "stability.train", *overrides, f"hydra.run.dir={run_dir}"]


def train(run_dir: Path, overrides: list[str], env: dict[str, str] | None = None,
          timeout: int = 420) -> tuple[list[dict], dict]:
    """One run to its end; its metrics rows and summary."""
    start = time.perf_counter()
    proc = subprocess.run(command(run_dir, overrides), capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"run failed: {' '.join(overrides)}")
    files = RunFiles(run_dir)
    print(f"  ({time.perf_counter() - start:.0f} s) {' '.join(overrides)}", flush=True)
    return read_jsonl(files.metrics), files.read_summary()


def environment() -> dict[str, Any]:
    try:
        runtime = Runtime.resolve(compose("trainer.device=cuda"))
    except ConfigError as error:
        raise SystemExit(f"gpu-check needs a CUDA GPU ({error})") from None
    name = torch.cuda.get_device_name()
    peak = gpu_peak_flops(name)
    return {
        "gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "peak_bf16_tflops": None if peak is None else peak / 1e12,
        "attention_backend": runtime.attention_backend, "fusions": runtime.fusions,
        "log_interval": runtime.log_interval,
        **{f"has_{p.split('.')[0]}": importlib.util.find_spec(p) is not None
           for p in ("transformer_engine", "flash_attn", "megatron.core", "triton")},
    }


def gpu_tests(timeout: int = 240) -> dict[str, Any]:
    """tests/train/test_gpu.py and the CPU-side checks of the GPU path, with pytest."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/train/test_gpu.py", "tests/train/test_gpu_path_on_cpu.py"],
        cwd=REPO, capture_output=True, text=True, timeout=timeout)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail)}
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
    return {"ok": proc.returncode == 0, **counts, "seconds": time.perf_counter() - start}


def parity(out: Path, steps: int) -> dict[str, Any]:
    common = [*QUIET, *PARITY, f"trainer.train_steps={steps}"]
    cpu, _ = train(out / "parity-cpu", [*common, "trainer.device=cpu"],
                   env={"CUDA_VISIBLE_DEVICES": ""})
    fp32, _ = train(out / "parity-gpu-fp32", [*common, "trainer.device=cuda",
                                              "trainer.precision=fp32",
                                              "model.attention_backend=sdpa"])
    bf16, _ = train(out / "parity-gpu-bf16", [*common, "trainer.device=cuda",
                                              "trainer.precision=bf16"])
    return {
        "fp32_max_rel": max(abs(b["loss"] - a["loss"]) / abs(a["loss"])
                            for a, b in zip(cpu, fp32, strict=True)),
        "bf16_max_abs": max(abs(c["loss"] - a["loss"]) for a, c in zip(cpu, bf16, strict=True)),
        "losses": [[a["loss"], b["loss"], c["loss"]] for a, b, c in zip(cpu, fp32, bf16)],
    }


def resume(out: Path) -> dict[str, Any]:
    """bf16 on the GPU: kill -9 after the checkpoint of step 8, run again, compare."""
    overrides = [*TINY, "trainer.device=cuda", "trainer.train_steps=16", "checkpoint.interval=4",
                 "trainer.log_interval=1", "logger.console=false"]
    reference, _ = train(out / "resume-reference", overrides)
    run_dir = out / "resume-killed"
    proc = subprocess.Popen(command(run_dir, overrides), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            run_dir / "checkpoints" / "step_00000008").exists():
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows, summary = train(run_dir, overrides)
    return {"killed": killed, "status": summary["status"],
            "steps_once": [r["step"] for r in rows] == list(range(1, 17)),
            "max_abs_loss_diff": max(abs(a["loss"] - b["loss"])
                                     for a, b in zip(reference, rows, strict=True))}


def rollback(out: Path) -> dict[str, Any]:
    rows, summary = train(out / "rollback", [
        *TINY, "trainer.device=cuda", "trainer.train_steps=70", "fault.at_step=50",
        "fault.kind=lr_spike", "fault.magnitude=300", "actions.on_spike=rollback",
        "actions.rollback_skip_batches=5", "checkpoint.interval=10", "checkpoint.keep_last=4",
        "trainer.log_interval=1", "logger.console=false"])
    return {"status": summary["status"], "rollbacks": summary["rollbacks"],
            "steps_once": [r["step"] for r in rows] == list(range(1, 71)),
            "final_loss": summary["final_loss"]}


def throughput(out: Path, steps: int, micro_batch: int, global_batch: int,
               watched: bool = True) -> dict[str, Any]:
    name = "350m" if watched else "350m-unwatched"
    rows, summary = train(out / name, [
        *QUIET, "size=350m", "recipe=llama2", "trainer.device=cuda", "trainer.precision=bf16",
        f"trainer.train_steps={steps}", f"optim.warmup_steps={max(1, steps // 10)}",
        "optim.lr=3e-4", "optim.min_lr=3e-5", f"trainer.micro_batch_size={micro_batch}",
        f"trainer.global_batch_size={global_batch}", "trainer.log_interval=10",
        *([] if watched else ["monitors.enabled=false", "detectors=none",
                              "actions.on_nonfinite=log"])])
    steady = rows[len(rows) // 2:]  # the second half: compiled, warmed up, allocator settled
    mfu = [r["mfu"] for r in steady if "mfu" in r]
    return {
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
        "model_tflops": sum(r["model_flops_per_s"] for r in steady) / len(steady) / 1e12,
        "mfu": sum(mfu) / len(mfu) if mfu else None,
        "peak_memory_gib": summary.get("peak_memory_gib"),
        "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
        "status": summary["status"],
    }


def table(results: dict[str, Any]) -> str:
    """One line per number: ``part.key  value``."""
    lines = []
    for part, values in results.items():
        for key, value in values.items():
            if key == "losses":
                continue
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"{part + '.' + key:<34} {text}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="the quick check of everything (about 6 minutes)")
    parser.add_argument("--steps", type=int, default=None, help="350m steps (300; smoke 40)")
    parser.add_argument("--parity-steps", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="run directories (default: tmp)")
    parser.add_argument("--json", type=Path, default=None, help="numbers as JSON")
    parser.add_argument("--skip-parity", action="store_true")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    start = time.perf_counter()
    results: dict[str, Any] = {"environment": environment()}
    print(f"== {results['environment']}", flush=True)
    steps = args.steps or (40 if args.smoke else 300)
    if args.smoke:
        print("== GPU tests", flush=True)
        results["tests"] = gpu_tests()
    if not args.skip_parity:
        print(f"== parity: tiny llama2, {args.parity_steps} steps", flush=True)
        results["parity"] = parity(out, args.parity_steps)
    if args.smoke:
        print("== resume after kill -9 (bf16)", flush=True)
        results["resume"] = resume(out)
        print("== rollback (bf16)", flush=True)
        results["rollback"] = rollback(out)
    print(f"== throughput: 350m llama2 bf16, {steps} steps", flush=True)
    results["throughput"] = throughput(out, steps, args.micro_batch, args.global_batch)
    if args.smoke:
        results["throughput_unwatched"] = throughput(out, steps, args.micro_batch,
                                                     args.global_batch, watched=False)
        watched, plain = results["throughput"], results["throughput_unwatched"]
        results["throughput"]["monitor_overhead"] = (plain["tokens_per_s"]
                                                     / watched["tokens_per_s"] - 1)
    results["environment"]["seconds"] = time.perf_counter() - start
    path = args.json or out / "gpu-check.json"
    path.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"== done in {time.perf_counter() - start:.0f} s; numbers in {path}; runs under {out}")


if __name__ == "__main__":
    main()
