"""Our training step against a plain-PyTorch one of the same shape and math, side by side.

``python -m benchmarks.throughput [--shapes tiny,study,small] [--threads 1,2] [--rounds 3]
[--compile]``

- ours: the Trainer as a user runs it (``train_step`` + ``finish_step`` with the default
  callbacks: monitors, detectors and actions, the metrics and events files), on the sample data;
- plain: a nanoGPT-style model of the same shape (SDPA, RoPE + SwiGLU + RMSNorm or learned
  positions + GELU + LayerNorm), ``F.cross_entropy`` plus the z-loss from a logsumexp, global
  norm clipping and torch's fused AdamW, on random tokens of the same batch shape;
- ours+compile (``--compile``): ours with ``trainer.compile=true`` (a second Trainer of the same
  run). Its first step at each thread count, which compiles (inductor builds its kernels for
  the thread count), is timed on its own: the compile cost is that step's time less a steady
  step of ours, and the break-even run length is that cost over the milliseconds a compiled
  step saves.

Both train in one process, alternating in rounds so that machine noise falls on both alike.
Per shape and thread count: ms/step of each, the ratio of tokens/s (ours / plain), and model
FLOP/s (6 N T plus attention, ``stability.throughput``) as a share of this machine's fp32
matmul rate (1024 x 1024 products, timed as a third arm of the same rounds, median like the
steps); per shape, the five largest costs of our step
(profiler self time).
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import stability  # noqa: F401
from stability import parallel
from stability.config import Config, compose
from stability.optim.adamw import build_optimizer
from stability.runtime import Runtime
from stability.throughput import model_flops_per_token
from stability.train import default_callbacks
from stability.trainer import Trainer

SHAPES = {"tiny": ["size=tiny"], "study": ["size=study"], "small": ["size=small"]}
"""The shapes: today's tiny and small presets, and the study shape of the CPU figures."""


# --------------------------------------------------------------------------- plain PyTorch
class Block(nn.Module):
    """One pre-norm block, Llama-style (RMSNorm, RoPE, SwiGLU) or GPT-style (LN, GELU, bias)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m = cfg.model
        h, self.heads = m.hidden_size, m.num_attention_heads
        norm = nn.RMSNorm if m.norm_type == "rmsnorm" else nn.LayerNorm
        self.swiglu = m.activation == "swiglu"
        ffn = m.ffn_size
        self.norm1, self.norm2 = norm(h, eps=m.norm_eps), norm(h, eps=m.norm_eps)
        self.qkv = nn.Linear(h, 3 * h, bias=m.bias)
        self.proj = nn.Linear(h, h, bias=m.bias)
        self.fc1 = nn.Linear(h, 2 * ffn if self.swiglu else ffn, bias=m.bias)
        self.fc2 = nn.Linear(ffn, h, bias=m.bias)
        self.rope = m.position_embedding == "rope"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, h))
        up = self.fc1(self.norm2(x))
        if self.swiglu:
            gate, up = up.chunk(2, dim=-1)
            up = F.silu(gate) * up
        else:
            up = F.gelu(up)
        return x + self.fc2(up)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class PlainGPT(nn.Module):
    def __init__(self, cfg: Config, vocab: int) -> None:
        super().__init__()
        m = cfg.model
        self.embed = nn.Embedding(vocab, m.hidden_size)
        self.pos = (nn.Embedding(cfg.data.seq_length, m.hidden_size)
                    if m.position_embedding == "learned" else None)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(m.num_layers))
        norm = nn.RMSNorm if m.norm_type == "rmsnorm" else nn.LayerNorm
        self.norm = norm(m.hidden_size, eps=m.norm_eps)
        self.head = nn.Linear(m.hidden_size, vocab, bias=False)
        if m.tie_embeddings:
            self.head.weight = self.embed.weight
        self.scale = math.sqrt(m.hidden_size) if m.scaled_embedding else 1.0
        d = m.hidden_size // m.num_attention_heads
        inv = 1.0 / (m.rotary_base ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.outer(torch.arange(cfg.data.seq_length).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) * self.scale
        if self.pos is not None:
            x = x + self.pos.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        return self.head(self.norm(x))


# --------------------------------------------------------------------------- measurement
def plain_step(model: PlainGPT, optimizer, tokens: torch.Tensor, z_loss: float) -> None:
    """One nanoGPT-style step: cross-entropy plus z-loss, clip, fused AdamW."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1]).float()
    flat = logits.view(-1, logits.shape[-1])
    loss = F.cross_entropy(flat, tokens[:, 1:].reshape(-1))
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(flat, dim=-1).square().mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def top_costs(step, steps: int = 3, top: int = 5) -> list[tuple[str, float]]:
    """The ``top`` ops by self time over ``steps`` steps: (name, share of the step)."""
    from torch.profiler import profile

    with profile() as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        total = (time.perf_counter() - start) * 1e6
    costs = collections.Counter()
    for event in prof.key_averages():
        costs[event.key] += event.self_cpu_time_total
    return [(name, us / total) for name, us in costs.most_common(top)]


def build_trainer(shape: str, recipe: str, run_dir: Path, compile: bool = False) -> Trainer:
    """Our Trainer on ``shape`` with its default callbacks, as a user runs it."""
    cfg = compose(f"recipe={recipe}", *SHAPES[shape], "optim.lr=1e-3", "trainer.device=cpu",
                  "trainer.train_steps=100000", "checkpoint.interval=0",
                  "checkpoint.save_final=false", "logger.console=false",
                  f"trainer.compile={str(compile).lower()}")
    runtime = Runtime.resolve(cfg)
    runtime.apply()
    trainer = Trainer(cfg, run_dir, default_callbacks(cfg, run_dir, True), runtime=runtime,
                      topology=TOPOLOGY)
    trainer.start(resume=False)
    return trainer


def measure(shape: str, recipe: str, thread_counts: list[int], rounds: int, steps: int,
            run_dir: Path, compile: bool = False) -> list[dict]:
    trainer = build_trainer(shape, recipe, run_dir / shape)
    cfg = trainer.cfg
    vocab, b, s = trainer.model.vocab_size, cfg.trainer.global_batch_size, cfg.data.seq_length
    plain = PlainGPT(cfg, vocab)
    plain_opt = build_optimizer(plain, cfg.optim)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (b, s + 1), generator=gen) for _ in range(4)]

    def ours() -> None:
        trainer.train_step()
        trainer.finish_step()

    counter = iter(range(1 << 30))

    def theirs() -> None:
        plain_step(plain, plain_opt, batches[next(counter) % 4], cfg.loss.z_loss)

    mat_a, mat_b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)

    def matmul() -> None:
        for _ in range(MATMULS_PER_STEP):
            torch.mm(mat_a, mat_b)

    arms = {"ours": ours, "plain": theirs, "matmul": matmul}
    compiled: list[Trainer] = []

    def ours_compiled() -> None:
        compiled[-1].train_step()
        compiled[-1].finish_step()

    flops = model_flops_per_token(cfg.model, vocab, s) * b * s
    results = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        if compile:
            # Inductor builds its CPU kernels for the thread count of the compile, and a
            # compiled model does not recompile when the count changes (its element-wise
            # kernels would stay on one thread): a new compiled Trainer for each count.
            compiled.append(build_trainer(shape, recipe, run_dir / f"{shape}-compile-{threads}",
                                          compile=True))
            arms["ours+compile"] = ours_compiled
            start = time.perf_counter()
            ours_compiled()  # inductor's on-disk cache may shorten a second run
            first_step = time.perf_counter() - start
        for _ in range(3):  # warm-up: allocator, kernels, optimizer state
            for step in arms.values():
                step()
        times = {name: [] for name in arms}
        for _ in range(rounds):
            for name, step in arms.items():
                for _ in range(steps):
                    start = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - start)
        # The matmul rate under the same conditions and statistic as the steps (timed in the
        # same rounds, median): a best-of rate beside median steps would bias the share down.
        peak = MATMULS_PER_STEP * 2 * MATMUL_N**3 / statistics.median(times.pop("matmul"))
        row = {"shape": shape, "threads": threads, "peak_gflops": peak / 1e9}
        for name, ts in times.items():
            row[f"{name}_ms"] = statistics.median(ts) * 1e3
            row[f"{name}_share"] = flops / statistics.median(ts) / peak
        row["ratio"] = row["plain_ms"] / row["ours_ms"]  # tokens/s ours / plain
        if compile:
            # The compile's cost beside an eager step, and the steps it takes to earn it back.
            row["compile_s"] = first_step - row["ours_ms"] / 1e3
            saved = row["ours_ms"] - row["ours+compile_ms"]
            row["break_even"] = row["compile_s"] * 1e3 / saved if saved > 0 else math.inf
        results.append(row)
    torch.set_num_threads(thread_counts[0])
    results[0]["top"] = top_costs(ours)
    if compile:
        first = compiled[0]  # the one built for this thread count
        results[0]["top+compile"] = top_costs(lambda: (first.train_step(), first.finish_step()))
    return results


TOPOLOGY: parallel.Topology | None = None
MATMUL_N, MATMULS_PER_STEP = 1024, 4
"""The matmul rate's arm: four fp32 1024 x 1024 products per timed 'step' (~40-90 ms here)."""


def main() -> None:
    global TOPOLOGY
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,study,small")
    parser.add_argument("--recipe", default="llama2")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with trainer.compile=true (ours+compile)")
    args = parser.parse_args()
    TOPOLOGY = parallel.init(torch.device("cpu"), 1, 1)
    # Each compiled Trainer is a new model instance, which dynamo compiles as a new entry of
    # the same code: past its default limit of 8 it would run the later ones eagerly.
    torch._dynamo.config.recompile_limit = 64
    thread_counts = [int(t) for t in args.threads.split(",")]
    run_dir = Path(tempfile.mkdtemp(prefix="throughput-"))
    rows = []
    for shape in args.shapes.split(","):
        rows += measure(shape, args.recipe, thread_counts, args.rounds, args.steps, run_dir,
                        args.compile)
    print(f"recipe={args.recipe}; ours = the Trainer with its default callbacks; plain = "
          f"nanoGPT-style; share = model FLOP/s / measured fp32 matmul rate")
    print(f"{'shape':<6} {'thr':>3} {'matmul GF/s':>11} {'ours ms':>8} {'plain ms':>8} "
          f"{'ours/plain':>10} {'ours share':>10} {'plain share':>11}")
    for r in rows:
        print(f"{r['shape']:<6} {r['threads']:>3} {r['peak_gflops']:>11.1f} {r['ours_ms']:>8.1f} "
              f"{r['plain_ms']:>8.1f} {r['ratio']:>10.3f} {r['ours_share']:>10.1%} "
              f"{r['plain_share']:>11.1%}")
    if args.compile:
        print("ours+compile: trainer.compile=true; compile s = its first step at that thread "
              "count less a step of ours; break-even = compile s / ms saved")
        print(f"{'shape':<6} {'thr':>3} {'compiled ms':>11} {'ours ms':>8} {'share':>6} "
              f"{'/plain':>6} {'compile s':>9} {'break-even steps':>16}")
        for r in rows:
            print(f"{r['shape']:<6} {r['threads']:>3} {r['ours+compile_ms']:>11.1f} "
                  f"{r['ours_ms']:>8.1f} {r['ours+compile_share']:>6.1%} "
                  f"{r['plain_ms'] / r['ours+compile_ms']:>6.3f} {r['compile_s']:>9.1f} "
                  f"{r['break_even']:>16.0f}")
    for r in rows:
        for key, label in (("top", "our"), ("top+compile", "our compiled")):
            if key in r:
                costs = ", ".join(f"{name[:40]} {share:.0%}" for name, share in r[key])
                print(f"top costs of {label} {r['shape']} step ({r['threads']} thread): {costs}")
    parallel.shutdown()


if __name__ == "__main__":
    main()
