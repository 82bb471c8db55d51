"""Per-step statistics worth watching, recorded as device tensors.

Every statistic is a tensor handed to ``state.record``; the loop moves a whole batch of steps
to the host in one transfer per flush (``trainer.log_interval``). Nothing here calls ``.item()``
or copies host data to the device.

Recorded keys (per layer ``N`` counts from 1, as megatron's ``layer_number``):

- ``grad_norm/layer_N``: gradient L2 norm of the layer's parameters (``interval``);
- ``update_ratio/layer_N``, ``update_ratio_max``: ||theta_after - theta_before|| / ||theta_before||
  measured on a fixed random share of each weight's rows (``update_interval``), on the fp32
  master weights where the optimizer keeps them (bf16 weights would hide updates below one
  bf16 ulp);
- ``attn_logit_max/layer_N``, ``attn_logit_max``: max over heads and positions of q.k/sqrt(d)
  (first sequence of the first micro batch, at most ``attention_rows`` evenly spaced query
  positions against every key, in the compute dtype: bounded memory and time at any length);
- ``adam_v_below_eps``: share of Adam second-moment entries with sqrt(v) < eps (eps dominates
  the update there: the "Adam eps" effect) (``interval``);
- ``embedding_std``: std of the embedding output ("Spike No More": keep it near 1)
  (``update_interval``).

Cadences are chosen so that the defaults cost under 2% of a step (benchmarks/overhead.py): the
leading statistics (attention logits, update ratios) every step, full passes every 10.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from stability.callbacks import Callback, Control, StepState
from stability.watch.config import MonitorConfig

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")


class Monitors(Callback):
    """Hooks into the model and the step to record the statistics above."""

    name = "monitors"

    def __init__(self, cfg: MonitorConfig, num_layers: int, seed: int) -> None:
        self.cfg = cfg
        self.num_layers = num_layers
        self.seed = seed
        self._attention: dict[int, torch.Tensor] = {}
        self._capture_attention = False
        self._updates = False
        self._embedding_recorded = False
        self._full = False
        self._before: list[torch.Tensor] | None = None
        self._causal_biases: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layer_index: dict[tuple[int, ...], torch.Tensor] = {}

    # ------------------------------------------------------------------ set-up
    def on_train_start(self, state: StepState) -> None:
        model = state.model
        # Parameter -> global layer index (0-based), or -1 for embedding / head / final norm.
        local_to_global = {i: layer.layer_number - 1
                           for i, layer in enumerate(model.decoder.layers)}
        self._layer_of = []
        for name, _ in model.named_parameters():
            match = _LAYER.search(name)
            self._layer_of.append(local_to_global[int(match.group(1))] if match else -1)
        self._counted = [param_is_not_tensor_parallel_duplicate(p) for p in state.params]
        # The same random rows of each parameter every step (seeded: identical on resume).
        generator = torch.Generator().manual_seed(self.seed)
        self._rows = []
        for p in state.params:
            n = p.shape[0]
            k = max(1, round(n * self.cfg.update_rows_fraction))
            rows = torch.randperm(n, generator=generator)[:k].sort().values
            self._rows.append(rows.to(p.device))
        for layer in model.decoder.layers:
            attention = layer.self_attention.core_attention
            attention.register_forward_pre_hook(self._attention_hook(layer.layer_number - 1))
        if getattr(model, "pre_process", False):
            model.embedding.register_forward_hook(self._embedding_hook(state))

    def _attention_hook(self, index: int):
        def hook(module, args):
            if not self._capture_attention or index in self._attention:
                return
            query, key = args[0][:, 0], args[1][:, 0]  # [s, heads, d], [s, groups, d]
            with torch.no_grad():
                # In the compute dtype (bf16 on GPU; fp32 stays fp32), on sampled query rows.
                rows, bias = self._probe_rows(query.shape[0], query.device, query.dtype)
                q = query.transpose(0, 1)[:, rows]  # [heads, rows, d]
                k = key.transpose(0, 1)  # [groups, s, d]
                if k.shape[0] != q.shape[0]:  # grouped-query attention: heads share a group
                    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
                scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=module.softmax_scale)
                self._attention[index] = scores.amax().float()
        return hook

    def _probe_rows(self, length: int, device: torch.device, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The query positions the probe reads (at most ``attention_rows``, evenly spaced, the
        last one included) and their causal bias (-inf above the diagonal); built once per
        length on the device, so the hot path copies nothing from the host."""
        key = (length, device, dtype)
        if key not in self._causal_biases:
            stride = -(-length // self.cfg.attention_rows)  # ceil
            rows = torch.arange(length - 1, -1, -stride, device=device).flip(0)
            bias = torch.full((length, length), float("-inf"), device=device,
                              dtype=dtype).triu(1)[rows]
            self._causal_biases[key] = (rows, bias)
        return self._causal_biases[key]

    def _embedding_hook(self, state: StepState):
        def hook(module, args, output):
            if self._updates and not self._embedding_recorded:  # the first micro batch's
                self._embedding_recorded = True
                state.record("embedding_std", output.detach().float().std())
        return hook

    # ------------------------------------------------------------------ per step
    def _due(self, state: StepState, every: int) -> bool:
        return self.cfg.enabled and every > 0 and (state.step + 1) % every == 0

    def on_step_start(self, state: StepState) -> None:
        self._capture_attention = self._due(state, self.cfg.attention_interval)
        self._attention = {}
        self._updates = self._due(state, self.cfg.update_interval)
        self._embedding_recorded = False
        self._full = self._due(state, self.cfg.interval)

    def before_optimizer_step(self, state: StepState, control: Control) -> None:
        if self._updates:
            self._before = [_master(p).detach()[rows]
                            for p, rows in zip(state.params, self._rows)]
        if not self._full:
            return
        grads = state.grads()  # None: sharded by megatron's distributed optimizer
        if grads is None:
            return
        squares = self._per_layer(grads)
        squares = _sum_over_model_parallel(squares)
        for i, value in enumerate(squares.sqrt().unbind()):
            state.record(f"grad_norm/layer_{i + 1}", value)

    def on_step_end(self, state: StepState) -> None:
        if self._capture_attention and self._attention:
            logits = torch.full((self.num_layers,), float("-inf"), device=state.device)
            for index, value in self._attention.items():
                logits[index] = value
            logits = _max_over_model_parallel(logits)
            for i, value in enumerate(logits.unbind()):
                state.record(f"attn_logit_max/layer_{i + 1}", value)
            state.record("attn_logit_max", logits.max())
        self._capture_attention = False
        if self._before is not None:
            after = [_master(p).detach()[rows] for p, rows in zip(state.params, self._rows)]
            deltas = self._per_layer(torch._foreach_sub(after, self._before))
            norms = self._per_layer(self._before)
            ratio = (_sum_over_model_parallel(deltas) /
                     _sum_over_model_parallel(norms).clamp(min=1e-30)).sqrt()
            for i, value in enumerate(ratio.unbind()):
                state.record(f"update_ratio/layer_{i + 1}", value)
            state.record("update_ratio_max", ratio.max())
            self._before = None
        if self._full:
            state.record("adam_v_below_eps", self._adam_v_below_eps(state.optimizer))

    # ------------------------------------------------------------------ helpers
    def _per_layer(self, tensors: list[torch.Tensor | None]) -> torch.Tensor:
        """Sum of squares per layer over this rank's (non-duplicate) tensors.

        One fused norm over the list and one scatter-add: a Python loop of small ops per
        parameter cost more than the statistics themselves.
        """
        chosen = [i for i, (t, layer, counted) in
                  enumerate(zip(tensors, self._layer_of, self._counted, strict=True))
                  if t is not None and layer >= 0 and counted]
        device = tensors[chosen[0]].device
        norms = torch.stack(torch._foreach_norm([tensors[i].float() for i in chosen]))
        key = tuple(chosen)
        if key not in self._layer_index:  # built once: no host-to-device copy per step
            self._layer_index[key] = torch.tensor([self._layer_of[i] for i in chosen],
                                                  device=device)
        index = self._layer_index[key]
        return torch.zeros(self.num_layers, device=device).index_add_(0, index, norms.square())

    @staticmethod
    def _adam_v_below_eps(optimizer: torch.optim.Optimizer) -> torch.Tensor:
        below, total = [], 0
        for group in optimizer.param_groups:
            eps = group["eps"]
            for p in group["params"]:
                state = optimizer.state.get(p)
                if state and "exp_avg_sq" in state:
                    # sqrt(v) < eps  <=>  v < eps^2 (v >= 0): one pass, no sqrt buffer.
                    below.append((state["exp_avg_sq"] < eps * eps).sum())
                    total += state["exp_avg_sq"].numel()
        if not below:
            return torch.zeros(())
        # A fill, not torch.tensor(total): no host-to-device copy on the hot path.
        counts = torch.stack([torch.stack(below).sum().float(),
                              torch.full((), float(total), device=below[0].device)])
        counts = _sum_over_model_parallel(counts)  # tensor-parallel shards of the same state
        return counts[0] / counts[1].clamp(min=1.0)


def _master(param: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master copy megatron's mixed-precision optimizer keeps of a bf16 weight
    (``main_param``), where it is whole; else the weight itself."""
    main = getattr(param, "main_param", None)
    return main if main is not None and main.shape == param.shape else param


def _model_parallel_size() -> int:
    return (parallel_state.get_tensor_model_parallel_world_size()
            * parallel_state.get_pipeline_model_parallel_world_size())


def _sum_over_model_parallel(x: torch.Tensor) -> torch.Tensor:
    if _model_parallel_size() > 1:
        dist.all_reduce(x, group=parallel_state.get_model_parallel_group())
    return x


def _max_over_model_parallel(x: torch.Tensor) -> torch.Tensor:
    if _model_parallel_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=parallel_state.get_model_parallel_group())
    return x
