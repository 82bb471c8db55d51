"""``model.init_from=hf:DIR``: a tiny random transformers Llama, saved locally, starts our
training with transformers' logits (fp32, within 1e-4), sharded for TP and PP; a config that
does not describe the checkpoint is refused in one line naming the key."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_config, make_trainer
from hf_models import (
    LLAMA_OVERRIDES,
    SAMPLE_TEXT,
    batch_stats,
    check_against_run,
    hf_logits,
    make_llama,
    our_logits,
)
from parity import train

from stability.data.loader import collate
from stability.data.tokenizer import HFTokenizer
from stability.errors import ConfigError
from stability.hf.export import export_hf
from stability.hf.load import check_init_from, divisible_by_for

SMALL = ["data.seq_length=32", "trainer.global_batch_size=2", "trainer.micro_batch_size=2",
         "trainer.train_steps=1", "checkpoint.save_final=false", "logger.console=false",
         "monitors.enabled=false", "detectors=none"]


@pytest.mark.parametrize("scaled", [False, True])
def test_first_step_logits_equal_transformers(tmp_path, hf_llama, single_process, scaled):
    # With scaled_embedding the table is loaded divided by sqrt(d): the same function.
    cfg = make_config(*LLAMA_OVERRIDES, *SMALL, f"model.init_from=hf:{hf_llama}",
                      f"model.scaled_embedding={str(scaled).lower()}")
    check_init_from(cfg)
    trainer = make_trainer(cfg, tmp_path, [], single_process)
    assert isinstance(trainer.data.tokenizer, HFTokenizer)  # DIR's tokenizer.json
    assert trainer.data.tokenizer.model_path == hf_llama / "tokenizer.json"
    batch = collate([trainer.data.train[i] for i in range(2)])  # the first global batch
    ours = our_logits(trainer.model, batch["tokens"])
    theirs = hf_logits(hf_llama, batch["tokens"])
    assert ours.shape == theirs.shape == (2, 32, 8192)
    assert theirs.std() > 0.5  # logits that depend on every weight, not near zero
    assert (ours - theirs).abs().max().item() < 1e-4
    # The first training step computes its loss on those logits.
    trainer.model.train()
    summary = trainer.fit()
    assert summary["final_loss"] == pytest.approx(batch_stats(theirs, batch["labels"])["loss"],
                                                  abs=1e-4)


def test_tensor_and_pipeline_parallel_ranks_load_their_shards(tmp_path, hf_llama,
                                                              single_process):
    # TP=2 x PP=2 (4 ranks): each rank loads its query groups, MLP rows and layers, so the
    # first step's recorded loss statistics are transformers' on the same batch. The run's
    # checkpoints export back (merging the 4 rank files) to what it computed at the next step,
    # and to what the same run computes in one process.
    run = tmp_path / "run"
    overrides = [*LLAMA_OVERRIDES, *SMALL, f"model.init_from=hf:{hf_llama}",
                 "trainer.micro_batch_size=1", "trainer.train_steps=3", "optim.lr=1e-2"]
    rows = train(run, [*overrides, "parallel.tensor=2", "parallel.pipeline=2",
                       "checkpoint.interval=2", "checkpoint.save_final=true"],
                 nproc=4, steps=3)
    check_against_run(run, hf_llama, 1, rows)
    assert export_hf(run, tmp_path / "step2", step=2)["step"] == 2
    check_against_run(run, tmp_path / "step2", 3, rows)
    export_hf(run, tmp_path / "final")
    twin = make_trainer(make_config(*overrides, "model.vocab_size_divisible_by=256"),
                        tmp_path / "one", [], single_process)
    twin.fit()
    tokens = torch.tensor([twin.data.tokenizer.encode(SAMPLE_TEXT)[:32]])
    difference = our_logits(twin.model, tokens) - hf_logits(tmp_path / "final", tokens)
    assert difference.abs().max().item() < 1e-4


def test_a_config_that_does_not_describe_the_checkpoint_is_refused(hf_llama):
    init = f"model.init_from=hf:{hf_llama}"
    with pytest.raises(ConfigError) as error:
        check_init_from(make_config(*LLAMA_OVERRIDES, init, "model.norm_eps=1e-5"))
    assert error.value.key == "model.norm_eps"
    message = str(error.value)
    assert "\n" not in message and "model.hidden_size=64" in message  # the overrides to paste
    for override, key in (("model.hidden_size=128", "model.hidden_size"),
                          ("model.num_query_groups=4", "model.num_query_groups"),
                          ("model.tie_embeddings=true", "model.tie_embeddings"),
                          ("model.qk_layernorm=true", "model.qk_layernorm"),
                          ("model.vocab_size_divisible_by=3000",
                           "model.vocab_size_divisible_by")):
        with pytest.raises(ConfigError) as error:
            check_init_from(make_config(*LLAMA_OVERRIDES, init, override))
        assert error.value.key == key, override
    with pytest.raises(ConfigError, match="hf:/nowhere.*config.json"):
        check_init_from(make_config(*LLAMA_OVERRIDES, "model.init_from=hf:/nowhere"))
    with pytest.raises(ConfigError, match="model.init_from"):
        make_config(*LLAMA_OVERRIDES, "model.init_from=/no/prefix").validate()


def test_checkpoints_no_class_of_ours_computes_are_refused(tmp_path):
    tied = make_llama(tmp_path / "tied", tie_word_embeddings=True)
    with pytest.raises(ConfigError) as error:  # a tied table cannot hold the sqrt(d) scale
        check_init_from(make_config(*LLAMA_OVERRIDES, f"model.init_from=hf:{tied}",
                                    "model.tie_embeddings=true", "model.scaled_embedding=true"))
    assert error.value.key == "model.scaled_embedding"
    config = json.loads((tied / "config.json").read_text())
    for change, word in (({"hidden_act": "gelu"}, "hidden_act"),
                         ({"model_type": "gpt2"}, "model_type"),
                         ({"mlp_bias": True}, "mlp_bias"),
                         ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}},
                          "llama3")):
        (tied / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match=word) as error:
            check_init_from(make_config(*LLAMA_OVERRIDES, f"model.init_from=hf:{tied}",
                                        "model.tie_embeddings=true"))
        assert error.value.key == "model.init_from"


def test_vocabulary_padding_suggestion():
    # The largest value up to the configured one that pads the tokenizer to the checkpoint.
    assert divisible_by_for(32000, 32000, 1, prefer=128) == 128
    assert divisible_by_for(32000, 32000, 4, prefer=128) == 125
    assert divisible_by_for(32000, 32000, 3, prefer=128) is None  # no split over 3 ranks
    assert divisible_by_for(31999, 32000, 2, prefer=8) == 8
    assert divisible_by_for(32001, 32000, 1, prefer=128) is None
    assert divisible_by_for(100, 128, 1, prefer=3) == 32  # none <= 3: the smallest that fits


def test_round_trip_through_training_and_export(tmp_path, hf_llama, single_process):
    # transformers -> init_from -> one training step -> stability-export hf -> transformers:
    # the exported model computes what the trained one does, its tokenizer is DIR's.
    from transformers import AutoTokenizer

    cfg = make_config(*LLAMA_OVERRIDES, *SMALL, f"model.init_from=hf:{hf_llama}",
                      "model.scaled_embedding=true", "checkpoint.save_final=true")
    trainer = make_trainer(cfg, tmp_path / "run", [], single_process)
    trainer.fit()
    info = export_hf(tmp_path / "run", tmp_path / "out")
    assert info["tokenizer"] == str(hf_llama / "tokenizer.json")
    tokens = AutoTokenizer.from_pretrained(tmp_path / "out")(
        SAMPLE_TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :32]
    assert tokens[0].tolist() == trainer.data.tokenizer.encode(SAMPLE_TEXT)[:32]
    difference = our_logits(trainer.model, tokens) - hf_logits(tmp_path / "out", tokens)
    assert difference.abs().max().item() < 1e-4
    assert (hf_logits(tmp_path / "out", tokens) - hf_logits(hf_llama, tokens)).abs().max() > 1e-3
