"""Batching: few shapes, nothing cropped, each row once an epoch, reproducible, resumable, fillers weigh 0."""

from __future__ import annotations

import numpy as np
import pytest

from lora_jax.data.batching import (
    bucket_length,
    default_buckets,
    epoch_batches,
    epoch_plan,
    eval_batches,
    num_batches,
)


def fake_dataset(n: int = 203, max_len: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded token arrays with random lengths; `labels` is the row number, so rows can be traced."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, max_len + 1, n)
    mask = (np.arange(max_len) < lengths[:, None]).astype(np.int32)
    ids = rng.integers(1, 1000, (n, max_len)).astype(np.int32) * mask
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids),
        "labels": np.arange(n),
    }


def real_rows(batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([b["labels"][b["weights"] > 0] for b in batches])


def test_default_buckets() -> None:
    assert default_buckets(128) == (16, 32, 64, 128)
    assert default_buckets(100) == (16, 32, 64, 100)
    assert default_buckets(512) == (16, 32, 64, 128, 256, 512)
    assert default_buckets(8) == (8,)
    assert bucket_length(17, (16, 32)) == 32 and bucket_length(16, (32, 16)) == 16
    with pytest.raises(ValueError, match="exceeds the largest bucket 32"):
        bucket_length(33, (16, 32))


@pytest.mark.parametrize("pool_batches", [1, 4])
def test_epoch_covers_every_row_once_with_few_shapes(pool_batches: int) -> None:
    data = fake_dataset()
    batches = list(epoch_batches(data, 16, seed=3, epoch=0, pool_batches=pool_batches))
    assert len(batches) == num_batches(data, 16) == 13
    np.testing.assert_array_equal(np.sort(real_rows(batches)), np.arange(203))
    shapes = {b["input_ids"].shape for b in batches}
    assert len(shapes) <= len(default_buckets(64)) and all(rows == 16 for rows, _ in shapes)
    for b in batches:
        rows = b["labels"]
        # Cropping keeps every real token: the batch's mask holds the row's full length.
        np.testing.assert_array_equal(b["attention_mask"].sum(1), data["attention_mask"][rows].sum(1))
        np.testing.assert_array_equal(b["input_ids"], data["input_ids"][rows, : b["input_ids"].shape[1]])
        # ...and the bucket is the smallest that fits the longest row.
        assert b["input_ids"].shape[1] == bucket_length(b["attention_mask"].sum(1).max(), default_buckets(64))


def test_pooling_reduces_padding() -> None:
    data = fake_dataset(n=800)
    padded = lambda pool: sum(b["input_ids"].size for b in epoch_batches(data, 8, 0, 0, pool_batches=pool))
    assert padded(20) < padded(1)


def test_epochs_are_reproducible_and_differ() -> None:
    data = fake_dataset()
    first = [b["labels"] for b in epoch_batches(data, 16, seed=7, epoch=2)]
    again = [b["labels"] for b in epoch_batches(data, 16, seed=7, epoch=2)]
    other_epoch = [b["labels"] for b in epoch_batches(data, 16, seed=7, epoch=3)]
    other_seed = [b["labels"] for b in epoch_batches(data, 16, seed=8, epoch=2)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(np.concatenate(first), np.concatenate(other_epoch))
    assert not np.array_equal(np.concatenate(first), np.concatenate(other_seed))


@pytest.mark.parametrize("skip", [0, 1, 5, 12, 13])
def test_resume_skip_is_tail_of_full_epoch(skip: int) -> None:
    data = fake_dataset()
    full = list(epoch_batches(data, 16, seed=1, epoch=4))
    resumed = list(epoch_batches(data, 16, seed=1, epoch=4, skip=skip))
    assert len(resumed) == len(full) - skip
    for a, b in zip(full[skip:], resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_short_batch_padding_and_drop_last() -> None:
    data = fake_dataset()  # 203 rows = 12 * 16 + 11
    plan = epoch_plan(data["attention_mask"].sum(1), 16, seed=0, epoch=0, pool_batches=4)
    assert sorted(len(p) for p in plan)[:2] == [11, 16]  # exactly one short batch
    short = next(b for b in epoch_batches(data, 16, 0, 0, pool_batches=4) if b["weights"].sum() < 16)
    assert short["weights"].tolist() == [1.0] * 11 + [0.0] * 5
    np.testing.assert_array_equal(short["labels"][11:], short["labels"][0])  # fillers repeat a real row
    dropped = list(epoch_batches(data, 16, 0, 0, pool_batches=4, drop_last=True))
    assert len(dropped) == num_batches(data, 16, drop_last=True) == 12
    assert all(b["weights"].sum() == 16 for b in dropped)


def test_rows_rounded_up_to_device_count() -> None:
    data = fake_dataset(n=30)
    batches = list(epoch_batches(data, 6, seed=0, epoch=0, num_devices=4))
    assert all(b["input_ids"].shape[0] == 8 and b["weights"].sum() == 6 for b in batches)
    np.testing.assert_array_equal(np.sort(real_rows(batches)), np.arange(30))


def test_eval_batches_in_order_with_masked_padding() -> None:
    data = fake_dataset(n=45)
    batches = list(eval_batches(data, 16, num_devices=3))  # 16 -> 18 rows
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 18 for b in batches)
    assert [b["weights"].sum() for b in batches] == [16, 16, 13]
    np.testing.assert_array_equal(real_rows(batches), np.arange(45))
    assert {b["input_ids"].shape[1] for b in batches} <= set(default_buckets(64))


def test_custom_buckets_and_too_small_buckets() -> None:
    data = fake_dataset(n=40, max_len=40)
    shapes = {b["input_ids"].shape[1] for b in epoch_batches(data, 4, 0, 0, buckets=(10, 20, 40))}
    assert shapes <= {10, 20, 40} and 40 in shapes
    # a bucket wider than the arrays is cropped to their width
    assert {b["input_ids"].shape[1] for b in eval_batches(data, 40, buckets=(64,))} == {40}
    with pytest.raises(ValueError, match="add a bucket"):
        list(eval_batches(data, 40, buckets=(8,)))
