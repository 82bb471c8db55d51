"""Batch order: deterministic from the seed, resumable, data-parallel exact, skippable."""

from __future__ import annotations

import pytest
import torch

from stability.data.loader import BatchLoader
from stability.errors import ConfigError


def take(loader: BatchLoader, n: int) -> list[dict[str, torch.Tensor]]:
    return [loader.next_micro_batch() for _ in range(n)]


def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def test_micro_batch_shapes_and_types(make_train_data) -> None:
    data = make_train_data()
    batch = data.loader.next_micro_batch()
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    for key, dtype in [
        ("tokens", torch.int64),
        ("labels", torch.int64),
        ("loss_mask", torch.float32),
        ("position_ids", torch.int64),
    ]:
        assert batch[key].shape == (4, 32) and batch[key].dtype == dtype, key
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])  # next-token labels
    assert torch.equal(batch["position_ids"][0], torch.arange(32))
    assert int(batch["tokens"].max()) < data.tokenizer.vocab_size


def test_order_is_a_function_of_the_seed(make_train_data) -> None:
    first = take(make_train_data(seed=1).loader, 4)
    assert same(first, take(make_train_data(seed=1).loader, 4))
    assert not torch.equal(first[0]["tokens"], take(make_train_data(seed=2).loader, 1)[0]["tokens"])


def test_resume_from_state_dict_continues_identically(make_train_data) -> None:
    reference = make_train_data().loader  # accumulation 2
    take(reference, 5)  # 2 global batches and the first micro step of the third
    state = reference.state_dict()
    assert state["consumed_samples"] == 16 and state["micro_step"] == 1
    expected = take(reference, 5)

    resumed = make_train_data().loader
    resumed.load_state_dict(state)
    assert same(take(resumed, 5), expected)


def test_data_parallel_ranks_split_the_same_global_batches(make_train_data) -> None:
    # One process: global 8, micro 4 (accumulation 2) ...
    single = take(make_train_data(global_batch_size=8, micro_batch_size=4).loader, 4)
    # ... and 2 ranks with micro 4 (accumulation 1) read the same samples in the same places.
    ranks = [
        take(make_train_data(micro_batch_size=4, dp_rank=r, dp_size=2).loader, 2) for r in (0, 1)
    ]
    assert same(single, [ranks[0][0], ranks[1][0], ranks[0][1], ranks[1][1]])
    # Micro 2 on 2 ranks (accumulation 2): the same set of samples per global batch.
    small = [
        take(make_train_data(micro_batch_size=2, dp_rank=r, dp_size=2).loader, 2) for r in (0, 1)
    ]
    union = torch.cat([b["tokens"] for rank in small for b in rank])
    reference = torch.cat([b["tokens"] for b in single[:2]])
    assert sorted(map(tuple, union.tolist())) == sorted(map(tuple, reference.tolist()))


def test_skip_global_batches_moves_ahead_by_whole_batches(make_train_data) -> None:
    straight = take(make_train_data().loader, 8)  # global batches 0..3, two micro steps each
    loader = make_train_data().loader
    take(loader, 2)
    loader.skip_global_batches(2)
    assert same(take(loader, 2), straight[6:8])
    assert loader.state_dict()["skipped_global_batches"] == 2
    assert loader.state_dict()["consumed_samples"] == 4 * 8
    take(loader, 1)
    with pytest.raises(ValueError, match="inside a global batch"):
        loader.skip_global_batches(1)


def test_background_workers_give_the_same_batches(make_train_data) -> None:
    expected = take(make_train_data().loader, 3)
    loader = make_train_data(num_workers=1).loader
    assert same(take(loader, 3), expected)
    state = loader.state_dict()
    more = take(loader, 2)
    resumed = make_train_data(num_workers=1).loader
    resumed.load_state_dict(state)
    assert same(take(resumed, 2), more)


def test_more_samples_than_one_epoch_repeat_the_data(tmp_path, tokenizer, make_train_data):
    from stability.data.indexed import write_indexed_dataset

    texts = [f"Document number {i}: 文書{i}。" * 5 for i in range(20)]
    write_indexed_dataset(tokenizer.encode_batch(texts), tmp_path / "tiny", tokenizer)
    tiny = {"name": "indexed", "path": str(tmp_path / "tiny"), "split": "1"}
    epoch = len(make_train_data(train_samples=1, **tiny).train)
    data = make_train_data(train_samples=3 * epoch + 5, **tiny)
    assert len(data.train) >= 3 * epoch + 5
    # Positions past the end wrap around instead of failing.
    loader = data.loader
    loader.skip_global_batches(len(data.train) // 8 + 1)
    assert loader.next_micro_batch()["tokens"].shape == (4, 32)


def test_a_dataset_rewritten_in_place_gets_fresh_indices(tmp_path, tokenizer, make_train_data):
    from stability.data.indexed import write_indexed_dataset

    tiny = {"name": "indexed", "path": str(tmp_path / "tiny"), "split": "1", "train_samples": 8}
    write_indexed_dataset(
        tokenizer.encode_batch(["short. " * 40] * 3), tmp_path / "tiny", tokenizer
    )
    before = make_train_data(**tiny)
    write_indexed_dataset(
        tokenizer.encode_batch(["longer! " * 90] * 9), tmp_path / "tiny", tokenizer
    )
    after = make_train_data(**tiny)
    assert len(after.train) > len(before.train)
    assert "longer" in after.tokenizer.decode(after.loader.next_micro_batch()["tokens"][0])


def test_validation_split_is_held_out_and_batched(make_train_data) -> None:
    data = make_train_data()
    assert data.valid is not None and len(data.valid) > 0
    batches = list(data.eval_batches(micro_batch_size=4, max_samples=10))
    assert len(batches) == 2 and batches[0]["tokens"].shape == (4, 32)
    again = list(make_train_data().eval_batches(micro_batch_size=4, max_samples=10))
    assert same(batches, again)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"name": "wiki"}, "data.name"),
        ({"name": "indexed"}, "data.path"),
        ({"name": "indexed", "path": "/nonexistent/prefix"}, "data.path"),
        ({"tokenizer": "/nonexistent/x.model"}, "data.tokenizer"),
        ({"split": "train=1"}, "data.split"),
        ({"split": "0,1,0"}, "data.split"),
        ({"global_batch_size": 6}, "trainer.global_batch_size"),
        ({"dp_rank": 2, "dp_size": 2}, "dp_rank"),
    ],
)
def test_bad_settings_name_the_key_and_value(make_train_data, overrides, key) -> None:
    with pytest.raises(ConfigError) as error:
        make_train_data(**overrides)
    assert error.value.key == key
    assert str(error.value).startswith(f"{key}=")


def test_builds_under_torch_distributed(single_process, make_train_data) -> None:
    batch = make_train_data().loader.next_micro_batch()
    assert batch["tokens"].shape == (4, 32)
