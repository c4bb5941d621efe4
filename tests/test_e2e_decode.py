"""causal_lm.decode_all (what experiments/e2e_decode.py and the few-shot floor decode with) keeps each decoded batch
as it lands, so a killed full-test-set decode resumes where it stopped and ends with every row's tokens in order."""

from __future__ import annotations

import numpy as np

from lora_jax.causal_lm import decode_all


def test_a_resumed_decode_skips_finished_batches_and_keeps_row_order(tmp_path):
    rows = 7
    dataset = {"input_ids": np.arange(rows * 3, dtype=np.int32).reshape(rows, 3),
               "attention_mask": np.ones((rows, 3), np.int32), "labels": np.arange(rows, dtype=np.int32)}  # fmt: skip
    calls = []

    def generate(params, batch):  # the "tokens" are each prompt's first id, twice
        calls.append(batch["input_ids"].shape[0])
        first = np.asarray(batch["input_ids"])[:, :1]
        return np.concatenate([first, first], axis=1)

    folder = tmp_path / "batches"
    full = decode_all(generate, None, dataset, 3, keep=folder)
    assert full[:, 0].tolist() == (np.arange(rows) * 3).tolist() and len(calls) == 3
    (folder / "00001.npy").unlink()  # as if killed while batch 1 was decoding
    calls.clear()
    again = decode_all(generate, None, dataset, 3, keep=folder)
    assert len(calls) == 1 and np.array_equal(again, full)
    assert not list(folder.glob("*.tmp.npy"))
    assert np.array_equal(decode_all(generate, None, dataset, 3), full)  # without a folder: nothing kept
