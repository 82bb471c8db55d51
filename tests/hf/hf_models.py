"""Tiny Hugging Face models built and saved locally (no hub), and our side of the parity checks."""

from __future__ import annotations

from pathlib import Path

import torch

from stability.data.sample import SAMPLE_TOKENIZER

SAMPLE_TEXT = ("The quick brown fox jumps over the lazy dog. 吾輩は猫である。名前はまだ無い。\n"
               "  sudo apt-get install 12345 packages; パッケージをインストールする 🙂 ")

LLAMA = {"vocab_size": 8192, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "max_position_embeddings": 64}
"""A tiny Llama with GQA, an MLP width of its own and the Llama 3 RoPE base."""

LLAMA_OVERRIDES = ["recipe=llama2", "model.num_layers=4", "model.hidden_size=64",
                   "model.num_attention_heads=4", "model.num_query_groups=2",
                   "model.ffn_hidden_size=96", "model.norm_eps=1e-6",
                   "model.rotary_base=500000", "model.scaled_embedding=false"]
"""Our keys for :data:`LLAMA`."""


def save_sample_tokenizer(folder: Path) -> None:
    """The sample SentencePiece tokenizer as tokenizer.json + tokenizer_config.json."""
    from transformers import PreTrainedTokenizerFast

    from stability.hf.tokenizer import special_tokens, spm_to_tokenizers

    model = SAMPLE_TOKENIZER.read_bytes()
    fast = PreTrainedTokenizerFast(tokenizer_object=spm_to_tokenizers(model),
                                   split_special_tokens=True, **special_tokens(model))
    fast.save_pretrained(folder)


def make_llama(folder: Path, seed: int = 0, std: float = 0.08, **changes) -> Path:
    """A random LlamaForCausalLM (weights ~ N(0, std), norms perturbed) saved in ``folder``
    with the sample tokenizer as tokenizer.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**LLAMA, **changes}, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3, initializer_range=std)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # not all ones: a swapped norm would show
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.normal_(0, std)
    model.save_pretrained(folder)
    save_sample_tokenizer(folder)
    return folder


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' fp32 logits of ``tokens`` [batch, seq] from the model folder."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def our_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Our model's logits of ``tokens`` [batch, seq] (one process, no parallelism)."""
    from stability.model.build import causal_mask

    seq = tokens.shape[1]
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=torch.arange(seq).expand_as(tokens),
                     attention_mask=causal_mask(seq, tokens.device))


def batch_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """What the trainer records of a batch's logits: cross-entropy, mean logsumexp, max |logit|."""
    lse = torch.logsumexp(logits.double(), dim=-1)
    target = logits.double().gather(-1, labels[..., None]).squeeze(-1)
    return {"loss": (lse - target).mean().item(), "logsumexp_mean": lse.mean().item(),
            "logit_max_abs": logits.abs().max().item()}


def run_batch(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The global batch a run trained on at ``step`` (1-based), rebuilt from its config."""
    from stability.data import build_train_data
    from stability.data.loader import collate
    from stability.hf.export import read_config

    cfg = read_config(run_dir / "config.yaml")
    t = cfg.trainer
    data = build_train_data(cfg.data, seed=t.seed, global_batch_size=t.global_batch_size,
                            micro_batch_size=t.global_batch_size, dp_rank=0, dp_size=1,
                            train_samples=t.train_steps * t.global_batch_size,
                            default_tokenizer=cfg.model.init_from_dir)
    g = t.global_batch_size
    return collate([data.train[i] for i in range((step - 1) * g, step * g)])


def check_against_run(run_dir: Path, folder: Path, step: int, rows: list[dict]) -> None:
    """The transformers model in ``folder`` gives, on the batch of ``step``, the loss
    statistics the run recorded for that step (the run computed them from the same weights:
    the checkpoint of ``step - 1``, or the initial weights)."""
    batch = run_batch(run_dir, step)
    expected = batch_stats(hf_logits(folder, batch["tokens"]), batch["labels"])
    row = next(r for r in rows if r["step"] == step)
    for key, value in expected.items():
        assert abs(row[key] - value) < 1e-4, (key, row[key], value)
