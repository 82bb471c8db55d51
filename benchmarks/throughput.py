"""Tokens/s of our megatron-core path vs a plain-PyTorch model of the same shape and math.

``python -m benchmarks.throughput [--size small] [--recipe llama2] [--threads 2] [--steps 8]``

Both models train side by side in one process on the same batches (AdamW, clip, the same loss),
alternating in rounds so that machine noise hits both alike. Also reports model FLOP/s (6 N T
plus attention) as a fraction of this machine's measured fp32 matmul rate.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import stability  # noqa: F401
from stability import cpu, parallel
from stability.config import Config, compose
from stability.model.build import build_model, causal_mask
from stability.model.loss import vocab_parallel_loss
from stability.optim.adamw import build_optimizer, clip_grads, grad_norm
from stability.runtime import Runtime
from stability.throughput import cpu_matmul_flops, model_flops_per_token


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
def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--recipe", default="llama2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = compose(f"recipe={args.recipe}", f"size={args.size}", "optim.lr=1e-3",
                  "trainer.device=cpu")
    runtime = Runtime.resolve(cfg)
    runtime.apply()
    parallel.init(runtime.device, 1, 1)
    cpu.seed_model_parallel_rng(0, 0, "cpu")
    vocab = 8192
    ours = build_model(cfg.model, runtime, vocab_size=vocab, seq_length=cfg.data.seq_length,
                       seed=cfg.trainer.seed)
    plain = PlainGPT(cfg, vocab)
    b, s = cfg.trainer.global_batch_size, cfg.data.seq_length
    mask = causal_mask(s, torch.device("cpu"))
    positions = torch.arange(s).expand(b, s)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (b, s + 1), generator=gen) for _ in range(4)]

    def step_ours(opt, i):
        tokens = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        logits = ours(input_ids=tokens[:, :-1], position_ids=positions, attention_mask=mask)
        loss = vocab_parallel_loss(logits, tokens[:, 1:], torch.ones(b, s), cfg.loss.z_loss)
        loss.loss.backward()
        params = [p for p in ours.parameters()]
        clip_grads(params, grad_norm(params), 1.0)
        opt.step()

    def step_plain(opt, i):
        tokens = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        logits = plain(tokens[:, :-1])
        loss = vocab_parallel_loss(logits, tokens[:, 1:], torch.ones(b, s), cfg.loss.z_loss)
        loss.loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()

    opt_ours = build_optimizer(ours, cfg.optim)
    opt_plain = build_optimizer(plain, cfg.optim)
    for i in range(2):  # warm-up: allocator, kernels, optimizer state
        step_ours(opt_ours, i)
        step_plain(opt_plain, i)
    times = {"megatron-core": [], "plain PyTorch": []}
    for _ in range(args.rounds):
        for name, fn, opt in (("megatron-core", step_ours, opt_ours),
                              ("plain PyTorch", step_plain, opt_plain)):
            for i in range(args.steps):
                times[name].append(_time(lambda fn=fn, opt=opt, i=i: fn(opt, i)))

    n_ours = sum(p.numel() for p in ours.parameters())
    n_plain = sum(p.numel() for p in plain.parameters())
    tokens = b * s
    flops = model_flops_per_token(cfg.model, vocab, s) * tokens
    # QK^T and AV run inside SDPA, not as matrix multiplies.
    gemm_flops = flops - 6 * cfg.model.num_layers * s * cfg.model.hidden_size * tokens
    peak = cpu_matmul_flops(args.threads, n=2048, reps=5)
    print(f"size={args.size} recipe={args.recipe} threads={args.threads} batch={b}x{s}")
    print(f"parameters: megatron-core {n_ours:,}  plain {n_plain:,}")
    print(f"measured fp32 matmul rate: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':<15} {'ms/step':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'of matmul':>9}")
    rates = {}
    for name, ts in times.items():
        t = statistics.median(ts)
        rates[name] = tokens / t
        print(f"{name:<15} {t * 1e3:>8.1f} {tokens / t:>9,.0f} {flops / t / 1e9:>8.1f} "
              f"{flops / t / peak:>9.1%}")
    print(f"ratio megatron-core / plain tokens/s: "
          f"{rates['megatron-core'] / rates['plain PyTorch']:.3f}")
    share, gemm_rate = gemm_share(lambda: step_ours(opt_ours, 0), gemm_flops)
    print(f"megatron-core step: {share:.0%} of the time in matrix multiplies, which run at "
          f"{gemm_rate / 1e9:.1f} GFLOP/s ({gemm_rate / peak:.0%} of the matmul rate); the rest "
          f"is memory-bound work (softmax over the vocabulary, attention, AdamW, norms)")


def gemm_share(step, flops: float, steps: int = 2) -> tuple[float, float]:
    """Share of a step's time spent in matrix multiplies, and their FLOP/s (profiler)."""
    from torch.profiler import profile

    with profile() as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        total = time.perf_counter() - start
    gemm = sum(e.self_cpu_time_total for e in prof.key_averages()
               if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")) / 1e6
    return gemm / total, flops * steps / max(gemm, 1e-9)


if __name__ == "__main__":
    main()
