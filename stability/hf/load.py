"""``model.init_from=hf:DIR``: start training from a Hugging Face Llama-architecture checkpoint.

Decision: **the config must describe the checkpoint**; nothing is derived behind the user's
back. Before any work (:func:`check_init_from`, from ``stability.train.run``) every model key
the checkpoint fixes is compared with its ``config.json``, and the first mismatch is refused in
one line naming the key, the value the checkpoint needs, and every override that matches it
(paste them). So the run's config.yaml states the architecture it trains, and a recipe's other
knobs (z-loss, eps, LR, ...) stay the user's. ``model.scaled_embedding=true`` is allowed with
an untied checkpoint: the table is loaded divided by sqrt(d), the same function under the
"Spike No More" parametrization. The vocabulary must pad to the checkpoint's ``vocab_size``
(``model.vocab_size_divisible_by`` x TP); the tokenizer is DIR's (``tokenizer.json``, else
``tokenizer.model``) unless ``data.tokenizer`` names one.

Loading (:func:`load_hf_weights`, from the trainer right after the model is built, before the
optimizer copies it): every rank opens the checkpoint's files (safetensors, memory-mapped, or
``pytorch_model.bin``) and reads only the tensors of its own pipeline stage, converts them
(``stability.hf.convert.FromLlama``) and copies in its tensor-parallel shard
(``stability.model.shards.load_into``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from stability.config import Config
from stability.errors import ConfigError
from stability.model.config import ModelConfig

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_hf_config(folder: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json``; ConfigError when there is none."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError("model.init_from", f"hf:{folder}",
                          "a folder holding a Hugging Face checkpoint (no config.json there)")
    return json.loads(path.read_text())


def rope_theta(hf: dict[str, Any]) -> tuple[float, str]:
    """(rope_theta, rope_type) of a config.json (transformers 4's ``rope_theta`` and
    ``rope_scaling``, or transformers 5's ``rope_parameters``)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), kind


def expected_keys(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Our model keys and the values a Llama ``config.json`` fixes; ConfigError for what our
    model cannot compute (naming the config.json key)."""
    def refuse(key: str, why: str) -> ConfigError:
        return ConfigError("model.init_from", source, f"config.json {key}={hf.get(key)!r}: {why}")

    if hf.get("model_type") != "llama":
        raise refuse("model_type", "a Llama-architecture checkpoint is needed (model_type "
                     "llama)")
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", "our SwiGLU is silu-gated")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise refuse("head_dim", "our heads are hidden_size / num_attention_heads wide")
    bias = bool(hf.get("attention_bias", False))
    if bool(hf.get("mlp_bias", False)) != bias:
        raise refuse("mlp_bias", "our model.bias sets attention and MLP biases together "
                     f"(attention_bias={bias})")
    theta, kind = rope_theta(hf)
    if kind != "default":
        raise ConfigError("model.init_from", source,
                          f"config.json rope type {kind!r}: only plain RoPE (default)")
    if theta != int(theta):
        raise ConfigError("model.init_from", source, f"config.json rope_theta={theta}: an "
                          f"integer base (model.rotary_base)")
    return {
        "model.num_layers": hf["num_hidden_layers"],
        "model.hidden_size": hf["hidden_size"],
        "model.num_attention_heads": heads,
        "model.num_query_groups": hf.get("num_key_value_heads") or heads,
        "model.ffn_hidden_size": hf["intermediate_size"],
        "model.norm_type": "rmsnorm",
        "model.norm_position": "pre",
        "model.norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "model.position_embedding": "rope",
        "model.rotary_base": int(theta),
        "model.activation": "swiglu",
        "model.bias": bias,
        "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "model.embedding_layernorm": False,
        "model.qk_layernorm": False,
    }


def _ours(m: ModelConfig, key: str) -> Any:
    name = key.split(".", 1)[1]
    if name == "num_query_groups":
        return m.query_groups
    if name == "ffn_hidden_size":
        return m.ffn_size
    return getattr(m, name)


def _override(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def divisible_by_for(vocab: int, target: int, tensor: int, prefer: int) -> int | None:
    """A ``model.vocab_size_divisible_by`` that pads ``vocab`` ids to ``target`` at
    tensor-parallel size ``tensor``: the largest up to ``prefer``, else the smallest; None
    when there is none."""
    if target % tensor or vocab > target:
        return None
    fits = [d for d in range(1, target // tensor + 1) if (target // tensor) % d == 0
            and math.ceil(vocab / (d * tensor)) * d * tensor == target]
    below = [d for d in fits if d <= prefer]
    return max(below) if below else (min(fits) if fits else None)


def check_init_from(cfg: Config) -> None:
    """Refuse, in one line naming the key, a config that does not describe the checkpoint of
    ``model.init_from`` (architecture, shapes, vocabulary); reads config.json and the tokenizer
    only."""
    m = cfg.model
    folder = Path(m.init_from_dir).expanduser()
    hf = read_hf_config(folder)
    expected = expected_keys(hf, m.init_from)
    if m.scaled_embedding and expected["model.tie_embeddings"]:
        raise ConfigError("model.scaled_embedding", True, f"false to load {m.init_from}: its "
                          f"embedding is tied to the output layer, so the x sqrt(d) scale "
                          f"cannot be divided out of it")
    everything = " ".join(f"{k}={_override(v)}" for k, v in expected.items())
    for key, value in expected.items():
        if _ours(m, key) != value:
            raise ConfigError(key, _ours(m, key), f"{_override(value)} to load {m.init_from} "
                              f"(overrides matching it: {everything})")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError("model.init_from", m.init_from,
                          f"a folder with weights ({', '.join(WEIGHT_FILES)})")
    from stability.data.train_data import load_tokenizer

    tokenizer = load_tokenizer(cfg.data, folder)
    tensor = cfg.parallel.tensor
    multiple = m.vocab_size_divisible_by * tensor
    padded = multiple * math.ceil(tokenizer.vocab_size / multiple)
    target = hf["vocab_size"]
    if padded != target:
        divisible = divisible_by_for(tokenizer.vocab_size, target, tensor,
                                     m.vocab_size_divisible_by)
        if divisible is None:
            raise ConfigError("parallel.tensor", tensor,
                              f"a size that divides the vocabulary of {m.init_from} "
                              f"(vocab_size={target}, tokenizer {tokenizer.vocab_size} ids)")
        raise ConfigError("model.vocab_size_divisible_by", m.vocab_size_divisible_by,
                          f"{divisible} (pads the tokenizer's {tokenizer.vocab_size} ids to "
                          f"{m.init_from}'s vocab_size={target} at parallel.tensor={tensor})")


class HFCheckpoint:
    """Reads tensors of a Hugging Face checkpoint folder by name, lazily (safetensors are
    memory-mapped; a ``pytorch_model.bin`` is loaded weights-only and memory-mapped)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._handles: dict[str, Any] = {}
        index = None
        for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (folder / name).is_file():
                index = json.loads((folder / name).read_text())["weight_map"]
                break
        if index is None:
            single = next((n for n in ("model.safetensors", "pytorch_model.bin")
                           if (folder / n).is_file()), None)
            if single is None:
                raise FileNotFoundError(f"no weights in {folder}")
            index = {name: single for name in self._open(single).keys()}
        self.files = index

    def _open(self, file: str) -> Any:
        if file not in self._handles:
            path = self.folder / file
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                self._handles[file] = safe_open(str(path), framework="pt", device="cpu")
            else:
                import torch

                self._handles[file] = torch.load(path, map_location="cpu", weights_only=True,
                                                 mmap=True)
        return self._handles[file]

    def __call__(self, name: str):
        if name not in self.files:
            raise KeyError(f"{name} is not in the checkpoint {self.folder}")
        handle = self._open(self.files[name])
        return handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]


def load_hf_weights(chunks: list, m: ModelConfig, *, tp_rank: int, tp_size: int) -> None:
    """Copy ``model.init_from``'s weights into this rank's model chunks (its pipeline stage
    and tensor-parallel shard)."""
    import torch

    from stability.hf.convert import FromLlama
    from stability.model.shards import load_into

    full = FromLlama(HFCheckpoint(Path(m.init_from_dir).expanduser()), m)
    with torch.no_grad():
        for chunk in chunks:
            load_into(chunk, full, tp_rank=tp_rank, tp_size=tp_size,
                      gated=m.activation == "swiglu")
