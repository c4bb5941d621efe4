"""experiments/e2e_decode.py keeps each decoded batch as it lands, so a killed full-test-set decode resumes where it
stopped and ends with every row's tokens in order."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
from e2e_decode import decode_resumably  # noqa: E402


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
    full = decode_resumably(generate, None, dataset, 3, folder)
    assert full[:, 0].tolist() == (np.arange(rows) * 3).tolist() and len(calls) == 3
    (folder / "00001.npy").unlink()  # as if killed while batch 1 was decoding
    calls.clear()
    again = decode_resumably(generate, None, dataset, 3, folder)
    assert len(calls) == 1 and np.array_equal(again, full)
    assert not list(folder.glob("*.tmp.npy"))
