"""A run's checkpoint as a Hugging Face model folder (``stability-export hf``).

The folder holds ``config.json`` (``LlamaForCausalLM`` or ``GPT2LMHeadModel``, see
``stability.hf.convert``), ``model.safetensors`` (the weights as the checkpoint stores them:
fp32 from a CPU run, bf16 from a GPU run) and the run's tokenizer as ``tokenizer.json`` +
``tokenizer_config.json`` (a SentencePiece model converted by ``stability.hf.tokenizer``, which
also keeps the original as ``tokenizer.model``). ``transformers.AutoModelForCausalLM`` and
``AutoTokenizer`` load it from the path. The vocabulary keeps the run's padding (the rows past
the tokenizer's ids stay, so the logits are ours, row for row).

The checkpoint is read offline: the rank files of any tensor/pipeline layout are merged on the
CPU (``stability.model.shards``). The folder is written beside ``OUT`` and renamed into place;
before that the saved tokenizer is loaded back with ``AutoTokenizer`` and must encode sample
text exactly as the run's tokenizer does.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from stability.checkpoint import Candidate, candidates
from stability.config import Config
from stability.errors import RunError

CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog.  Twice\n\tand 12345 digits.",
    "吾輩は猫である。名前はまだ無い。 パッケージをインストールする 🙂",
    " leading space, trailing space ",
)


def find_checkpoint(run_dir: Path, step: int | None) -> Candidate:
    """The newest intact checkpoint of ``run_dir``, or the one of ``step``; RunError if none."""
    found, damaged = candidates(run_dir / "checkpoints")
    if step is not None:
        found = [c for c in found if c.step == step]
    if not found:
        steps = [c.step for c in candidates(run_dir / "checkpoints")[0]]
        what = f"no intact checkpoint of step {step}" if step is not None else \
            "no intact checkpoint"
        detail = f" (steps: {', '.join(map(str, steps))})" if steps else ""
        if damaged and not steps:
            detail = f" ({damaged[0]})"
        raise RunError(f"{run_dir}: {what}{detail}")
    return found[0]


def read_config(path: Path) -> Config:
    """The typed config a checkpoint was trained with (keys added since take defaults)."""
    node = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    return OmegaConf.to_object(node)


def save_tokenizer(tokenizer: Any, out: Path, max_length: int) -> None:
    """The run's tokenizer in ``out`` as transformers saves a fast tokenizer."""
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    from stability.data.tokenizer import HFTokenizer
    from stability.hf.tokenizer import special_tokens, spm_to_tokenizers

    if isinstance(tokenizer, HFTokenizer):
        backend = Backend.from_str(tokenizer.json)
        ids = {"bos_token": tokenizer.bos, "eos_token": tokenizer.eod,
               "unk_token": tokenizer.unk, "pad_token": tokenizer.pad}
        specials = {k: tokenizer.id_to_piece(v) for k, v in ids.items()
                    if v is not None and v >= 0}
        split = tokenizer.split_special_tokens
    else:
        model = tokenizer.model_path.read_bytes()
        backend = spm_to_tokenizers(model)
        specials = special_tokens(model)
        split = True  # SentencePiece never reads a special piece from the text
        (out / "tokenizer.model").write_bytes(model)
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=split,
                                   clean_up_tokenization_spaces=False,
                                   model_max_length=max_length, **specials)
    fast.save_pretrained(out)
    # transformers 5 names the class TokenizersBackend, which transformers 4 does not know;
    # both load PreTrainedTokenizerFast from tokenizer.json.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def check_tokenizer(tokenizer: Any, out: Path) -> None:
    """``AutoTokenizer`` on ``out`` must encode sample text as the run's tokenizer does."""
    from transformers import AutoTokenizer

    from stability.data.sample import iter_sample_documents

    loaded = AutoTokenizer.from_pretrained(out)
    texts = list(CHECK_TEXTS)
    for i, document in enumerate(iter_sample_documents()):
        if i >= 8:
            break
        texts.append(document["text"][:300])
    for text in texts:
        theirs = loaded(text, add_special_tokens=False, verbose=False)["input_ids"]
        if theirs != tokenizer.encode(text):
            raise RunError(f"the exported tokenizer encodes {text[:40]!r} differently from the "
                           f"run's tokenizer {tokenizer.model_path}; nothing written")


def export_hf(run_dir: Path, out: Path, step: int | None = None) -> dict[str, Any]:
    """Write the checkpoint of ``run_dir`` (newest, or ``step``) as a transformers model folder
    ``out``; what was written.

    Raises:
        RunError: No such checkpoint, ``out`` is not empty, or the tokenizer check failed.
        stability.hf.convert.Unsupported: The model has a knob no transformers class expresses.
        stability.hf.tokenizer.TokenizerConversionError: A SentencePiece setting that does not
            convert.
    """
    from safetensors.torch import save_file

    from stability.data.train_data import load_tokenizer
    from stability.hf.convert import HF_CLASSES, architecture, hf_config, to_hf
    from stability.model.shards import read_checkpoint_model

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"{out} exists and is not an empty folder; nothing written")
    checkpoint = find_checkpoint(run_dir, step)
    cfg = read_config(checkpoint.config)
    m = cfg.model
    arch = architecture(m)
    tokenizer = load_tokenizer(cfg.data, m.init_from_dir)
    full = read_checkpoint_model(checkpoint.path, m.num_layers, m.activation == "swiglu",
                                 m.tie_embeddings, cfg.parallel.virtual_pipeline)
    embedding = full["embedding.word_embeddings.weight"]
    weights = to_hf(full, m, arch)
    special_ids = {"bos": tokenizer.bos, "eos": tokenizer.eod,
                   "pad": tokenizer.pad if tokenizer.pad is not None and tokenizer.pad >= 0
                   else None}
    config = hf_config(m, arch, vocab_size=embedding.shape[0], seq_length=cfg.data.seq_length,
                       special_ids=special_ids, dtype=embedding.dtype)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in weights.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_tokenizer(tokenizer, tmp, cfg.data.seq_length)
        check_tokenizer(tokenizer, tmp)
        umask = os.umask(0)
        os.umask(umask)
        for file in tmp.iterdir():  # safetensors writes owner-only files
            file.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"path": str(out), "class": HF_CLASSES[arch], "step": checkpoint.step,
            "parameters": sum(v.numel() for v in weights.values()),
            "vocab_size": embedding.shape[0], "tokenizer": str(tokenizer.model_path),
            "dtype": str(embedding.dtype).removeprefix("torch.")}
