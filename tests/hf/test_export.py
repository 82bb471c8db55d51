"""``stability-export hf``: a run's checkpoint as a transformers model folder.

transformers itself is the client: ``AutoModelForCausalLM`` and ``AutoTokenizer`` load the
folder; its fp32 logits equal ours within 1e-4 (Llama2 recipe -> LlamaForCausalLM, GPT recipe
-> GPT2LMHeadModel, with their knobs' variants), its tokenizer encodes like ours. From a PP=2
run (torchrun on gloo; TP=2 x PP=2: test_init_from.py) the references are the run itself (the
loss statistics it recorded at the step after the exported checkpoint, on the batch it trained
on) and the same run in one process.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_config, make_trainer
from hf_models import SAMPLE_TEXT, check_against_run, hf_logits, our_logits
from parity import train

from stability.export import main as export_main
from stability.hf.convert import Unsupported, architecture
from stability.hf.export import export_hf, read_config

TINY = ["data.seq_length=32", "trainer.global_batch_size=2", "trainer.micro_batch_size=2",
        "trainer.train_steps=3", "optim.lr=1e-2", "model.init_std=0.08",
        "checkpoint.interval=0", "logger.console=false", "monitors.enabled=false",
        "detectors=none"]


def train_in_process(run_dir, overrides, topology):
    cfg = make_config(*TINY, *overrides)
    trainer = make_trainer(cfg, run_dir, [], topology)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("overrides, hf_class", [
    (["recipe=llama2", "model.num_query_groups=2"], "LlamaForCausalLM"),  # GQA, scaled
    (["recipe=llama2", "model.bias=true", "model.tie_embeddings=true",
      "model.scaled_embedding=false"], "LlamaForCausalLM"),
    (["recipe=gpt"], "GPT2LMHeadModel"),  # tied, biases
    (["recipe=gpt", "model.tie_embeddings=false", "model.scaled_embedding=true",
      "model.bias=false", "model.ffn_hidden_size=96"], "GPT2LMHeadModel"),
], ids=["llama2-gqa", "llama2-bias-tied", "gpt", "gpt-untied-scaled-nobias"])
def test_exported_logits_equal_ours(tmp_path, single_process, overrides, hf_class):
    from transformers import AutoTokenizer

    trainer = train_in_process(tmp_path / "run", overrides, single_process)
    info = export_hf(tmp_path / "run", tmp_path / "hf")
    assert (info["class"], info["step"]) == (hf_class, 3)
    assert read_config(tmp_path / "run" / "checkpoints" / "step_00000003" / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    assert ids == trainer.data.tokenizer.encode(SAMPLE_TEXT)
    assert tokenizer.decode(ids) == SAMPLE_TEXT
    tokens = torch.tensor([ids[:32], ids[-32:]])
    theirs = hf_logits(tmp_path / "hf", tokens)
    ours = our_logits(trainer.model, tokens)
    assert theirs.std() > 0.5  # logits that depend on every weight, not near zero
    assert (ours - theirs).abs().max().item() < 1e-4


def test_export_from_a_pipeline_parallel_run(tmp_path, single_process):
    # GPT on 2 stages: the tied embedding lives on both, learned positions on the first.
    # (A TP=2 x PP=2 Llama run: tests/hf/test_init_from.py.)
    run, out = tmp_path / "run", tmp_path / "hf"
    common = [*TINY, "recipe=gpt", "trainer.micro_batch_size=1",
              "model.vocab_size_divisible_by=256"]
    rows = train(run, [*common, "parallel.pipeline=2", "checkpoint.interval=2",
                       "checkpoint.save_final=true"], nproc=2, steps=3)
    assert export_main(["hf", str(run), "--step", "2", str(out)]) == 0
    check_against_run(run, out, 3, rows)
    # The same run in one process (same initial weights, batches and updates): its logits
    # at the end are the exported final checkpoint's.
    assert export_main(["hf", str(run), str(tmp_path / "final")]) == 0
    twin = train_in_process(tmp_path / "one", common, single_process)
    tokens = torch.tensor([twin.data.tokenizer.encode(SAMPLE_TEXT)[:32]])
    theirs = hf_logits(tmp_path / "final", tokens)
    assert theirs.std() > 0.5
    assert (our_logits(twin.model, tokens) - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("override, key", [
    ("model.norm_position=post", "model.norm_position"),
    ("model.norm_position=sandwich", "model.norm_position"),
    ("model.embedding_layernorm=true", "model.embedding_layernorm"),
    ("model.qk_layernorm=true", "model.qk_layernorm"),
    ("model.norm_type=layernorm", "model.norm_type"),
    ("model.activation=gelu", "model.activation"),
    ("model.tie_embeddings=true", "model.scaled_embedding"),  # tied + scaled
])
def test_knobs_no_class_expresses_are_refused(override, key):
    with pytest.raises(Unsupported) as error:
        architecture(make_config("recipe=llama2", override).model)
    assert error.value.key == key and "\n" not in str(error.value)


def test_gpt_knobs_no_class_expresses_are_refused():
    for override, key in (("model.num_query_groups=2", "model.num_query_groups"),
                          ("model.norm_type=rmsnorm", "model.norm_type"),
                          ("model.activation=swiglu", "model.activation")):
        with pytest.raises(Unsupported) as error:
            architecture(make_config("recipe=gpt", override).model)
        assert error.value.key == key


def test_the_command_refuses_in_one_line(tmp_path, single_process, capsys):
    train_in_process(tmp_path / "post", ["recipe=gpt", "model.norm_position=post",
                                         "trainer.train_steps=1"], single_process)
    assert export_main(["hf", str(tmp_path / "post"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "model.norm_position='post'" in error
    assert not (tmp_path / "out").exists()
    assert export_main(["hf", str(tmp_path / "post"), "--step", "7", str(tmp_path / "o")]) == 2
    assert "no intact checkpoint of step 7 (steps: 1)" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert export_main(["hf", str(tmp_path / "post"), str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
