"""Batches of token arrays with few distinct shapes, reproducible shuffling, and weights for padding.

A dataset is a dict of numpy arrays sharing the leading dimension (what `glue.tokenize` returns), with
`attention_mask` right-padded. Every batch has exactly `batch_size` rows (rounded up to a multiple of the
device count) and a length from a short list of buckets, so a jitted step compiles once per bucket. Rows added
to fill a batch copy a real row and carry `weights == 0`: losses and metrics must weight by `weights`.

Shuffling is a pure function of (seed, epoch): a run resumed at batch k of an epoch replays the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

Batch = dict[str, np.ndarray]
Dataset = Mapping[str, np.ndarray]
# An encoder-decoder's target side, cropped by decoder_attention_mask instead of attention_mask.
DECODER_KEYS = ("decoder_input_ids", "decoder_attention_mask", "labels")


def subset_indices(total: int, n: int | None, seed: int = 0) -> np.ndarray:
    """Indices of `n` of `total` rows drawn without replacement by `seed`, in their original order (all rows when
    n is None or >= total): the same rows for every run of a comparison that shares the seed."""
    if n is None or n >= total:
        return np.arange(total)
    if n < 1:
        raise ValueError(f"data.train_examples must be >= 1 (or null: every row), got {n}.")
    return np.sort(np.random.default_rng(seed).permutation(total)[:n])


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` below max_len, then max_len: 100 -> (16, 32, 64, 100)."""
    buckets, b = [], smallest
    while b < max_len:
        buckets.append(b)
        b *= 2
    return (*buckets, max_len)


def sequence_lengths(dataset: Dataset) -> np.ndarray:
    return dataset["attention_mask"].sum(axis=1)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length` tokens."""
    for b in sorted(buckets):
        if b >= length:
            return b
    raise ValueError(f"a sequence of {length} tokens exceeds the largest bucket {max(buckets)}: add a bucket")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def take(dataset: Dataset, indices: np.ndarray, rows: int, buckets: Sequence[int]) -> Batch:
    """Rows `indices` of the dataset as one batch of `rows` rows, cropped to the bucket of its longest row.

    Target-side arrays (DECODER_KEYS, when the dataset has a decoder_attention_mask) get their own bucket.
    Filler rows repeat the first real row (a fully masked row can make attention produce NaN) with weight 0.
    """
    if not 0 < len(indices) <= rows:
        raise ValueError(f"a batch needs 1 to {rows} indices, got {len(indices)}")
    widths = {}  # key -> cropped width of its 2-D array
    for mask_key, keys in (("attention_mask", None), ("decoder_attention_mask", DECODER_KEYS)):
        if mask_key in dataset:
            mask = dataset[mask_key]
            width = min(bucket_length(int(mask[indices].sum(axis=1).max()), buckets), mask.shape[1])
            widths.update(dict.fromkeys(keys or dataset, width))
    filled = np.concatenate([indices, np.full(rows - len(indices), indices[0])])
    batch = {k: v[filled, : widths[k]] if v.ndim == 2 else v[filled] for k, v in dataset.items()}
    batch["weights"] = (np.arange(rows) < len(indices)).astype(np.float32)
    return batch


def epoch_plan(
    lengths: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    pool_batches: int = 50,
    drop_last: bool = False,
) -> list[np.ndarray]:
    """Row indices of each batch of one epoch.

    The rows are permuted, then cut into pools of `pool_batches` batches; each pool is sorted by length before
    being cut into batches, so a batch holds rows of similar length and pads little (HF Trainer's
    group_by_length does the same with 50). The batch order is then shuffled. pool_batches=1 gives plain
    random batches. At most one batch (the last of the last pool) is short; drop_last drops it.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    pool = batch_size * pool_batches
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return [batches[i] for i in rng.permutation(len(batches))]


def epoch_batches(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    skip: int = 0,
    buckets: Sequence[int] | None = None,
    num_devices: int = 1,
    pool_batches: int = 50,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """The shuffled training batches of one epoch, from batch `skip` on (to resume mid-epoch)."""
    buckets = buckets or default_buckets(dataset["attention_mask"].shape[1])
    plan = epoch_plan(sequence_lengths(dataset), batch_size, seed, epoch, pool_batches, drop_last)
    rows = _round_up(batch_size, num_devices)
    for indices in plan[skip:]:
        yield take(dataset, indices, rows, buckets)


def num_batches(dataset: Dataset, batch_size: int, drop_last: bool = False) -> int:
    n = len(dataset["attention_mask"])
    return n // batch_size if drop_last else -(-n // batch_size)


def eval_batches(
    dataset: Dataset, batch_size: int, *, buckets: Sequence[int] | None = None, num_devices: int = 1
) -> Iterator[Batch]:
    """All rows in order; the last batch is filled up with weight-0 rows."""
    buckets = buckets or default_buckets(dataset["attention_mask"].shape[1])
    rows = _round_up(batch_size, num_devices)
    n = len(dataset["attention_mask"])
    for start in range(0, n, batch_size):
        yield take(dataset, np.arange(start, min(start + batch_size, n)), rows, buckets)
