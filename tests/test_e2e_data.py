"""E2E NLG data: reading `MR||reference` files, grouping references per MR, causal-LM rows, padding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from lora_jax.data import e2e
from lora_jax.data.batching import default_buckets, epoch_batches

REAL_E2E = Path(os.environ.get(e2e.E2E_DIR_ENV, Path(__file__).resolve().parents[2] / "shared/data/e2e"))
REAL_TOKENIZER = Path(
    os.environ.get(e2e.GPT2_TOKENIZER_ENV, Path(__file__).resolve().parents[2] / "shared/models/gpt2-tokenizer")
)
# The challenge's official split sizes (microsoft/LoRA's files; the test set's 630 MRs as in testset.csv).
REAL_ROWS = {"train": 42_061, "validation": 4_672, "test": 4_693}
REAL_MRS = {"validation": 547, "test": 630}


def _real_dir() -> Path:
    if not (REAL_E2E / "test.txt").is_file():
        pytest.skip(f"no real E2E data at {REAL_E2E}")
    return REAL_E2E


@pytest.fixture(scope="module")
def tokenizer():
    if not (REAL_TOKENIZER / "vocab.json").is_file():
        pytest.skip(f"no GPT-2 tokenizer at {REAL_TOKENIZER}")
    return e2e.gpt2_tokenizer(REAL_TOKENIZER)


def _write(folder: Path, name: str, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(f"{line} \n" for line in lines), encoding="utf-8")
    return folder


TINY = [
    "name : Aromi | Type : pub||Aromi is a pub .",
    "name : Aromi | Type : pub||There is a pub called Aromi .",
    "name : Blue Spice | area : riverside||Blue Spice is by the riverside .",
    "name : Aromi | Type : pub||Aromi , a pub .",  # the same MR again, not next to its others
]


def test_reads_pairs_and_groups_references_per_mr(tmp_path: Path) -> None:
    folder = _write(tmp_path, "test.txt", TINY)
    split = e2e.load_e2e("test", folder)
    assert split.mrs[2] == "name : Blue Spice | area : riverside"
    assert split.references[2] == "Blue Spice is by the riverside ."  # trailing " \n" of the files stripped
    grouped = e2e.group_by_mr(split)
    assert grouped.mrs == ("name : Aromi | Type : pub", "name : Blue Spice | area : riverside")
    assert grouped.references[0] == ("Aromi is a pub .", "There is a pub called Aromi .", "Aromi , a pub .")


def test_folder_from_env_and_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _write(tmp_path / "e2e", "valid.txt", TINY[:2])
    monkeypatch.setenv(e2e.E2E_DIR_ENV, str(folder))
    assert len(e2e.load_e2e("validation")) == 2
    with pytest.raises(FileNotFoundError, match="train.txt is missing"):
        e2e.load_e2e("train")
    with pytest.raises(ValueError, match="unknown E2E split 'dev'"):
        e2e.load_e2e("dev")
    monkeypatch.delenv(e2e.E2E_DIR_ENV)
    with pytest.raises(ValueError, match=f"set {e2e.E2E_DIR_ENV}"):
        e2e.load_e2e("validation")
    _write(folder, "test.txt", [TINY[0], "name : Aromi without a separator"])
    with pytest.raises(ValueError, match=r"test.txt:2 is not an `MR\|\|reference` line"):
        e2e.load_e2e("test", folder)


def test_causal_rows_train_on_the_completion_only(tmp_path: Path, tokenizer) -> None:
    split = e2e.load_e2e("test", _write(tmp_path, "test.txt", TINY))
    rows = e2e.tokenize_causal(split, tokenizer)
    eos = tokenizer.eos_token_id
    for i, (mr, ref) in enumerate(zip(split.mrs, split.references, strict=True)):
        ids, mask, loss = (rows[k][i] for k in ("input_ids", "attention_mask", "loss_mask"))
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any() and not loss[n:].any()
        context = tokenizer(mr, add_special_tokens=False)["input_ids"] + [eos]
        completion = tokenizer(" " + ref, add_special_tokens=False)["input_ids"] + [eos]
        assert ids[:n].tolist() == context + completion  # LoRA's gpt2_encode.py layout
        assert loss.tolist()[:n] == [0] * len(context) + [1] * len(completion)
        assert tokenizer.decode(ids[loss == 1]) == f" {ref}<|endoftext|>"
    prompts = e2e.tokenize_prompts(split.mrs, tokenizer)
    for i in range(len(split)):  # a decoding prompt is exactly the context the model was trained on
        n = int(prompts["attention_mask"][i].sum())
        first_loss = int(np.argmax(rows["loss_mask"][i]))
        assert prompts["input_ids"][i, :n].tolist() == rows["input_ids"][i, :first_loss].tolist()
    with pytest.raises(ValueError, match="raise data.max_len"):
        e2e.tokenize_causal(split, tokenizer, max_len=8)


def test_completion_texts_stop_at_the_first_eos(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    words = tokenizer(" Aromi is a pub .", add_special_tokens=False)["input_ids"]
    generated = np.array([words + [eos] + words[:3], words + words[:1] + [eos, eos, eos]])
    assert e2e.completion_texts(generated, tokenizer) == ["Aromi is a pub .", "Aromi is a pub . A"]


def test_padding_fraction_is_what_the_batcher_pads() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 116, size=403)  # E2E-like rows; the last batch is short
    width = int(lengths.max())
    dataset = {"attention_mask": (np.arange(width) < lengths[:, None]).astype(np.int32)}
    for buckets in (default_buckets(width), e2e.length_buckets(lengths, 8)):
        batches = list(epoch_batches(dataset, 8, seed=3, epoch=1, buckets=buckets))
        # Pad slots, plus the tokens of filler rows (a repeated real row with weight 0): both are waste.
        wasted = sum(
            int((b["attention_mask"] == 0).sum() + b["attention_mask"][b["weights"] == 0].sum()) for b in batches
        )
        total = sum(b["attention_mask"].size for b in batches)
        measured = e2e.padding_fraction(lengths, 8, buckets, seed=3, epoch=1)
        assert measured == pytest.approx(wasted / total)
    assert e2e.length_buckets(np.array([20, 33, 115]), 8) == (*range(24, 113, 8), 115)


@pytest.mark.slow
def test_real_split_sizes_and_mr_groups() -> None:
    folder = _real_dir()
    for split, rows in REAL_ROWS.items():
        data = e2e.load_e2e(split, folder)
        assert len(data) == rows
        grouped = e2e.group_by_mr(data)
        assert sum(len(refs) for refs in grouped.references) == rows
        assert len(set(grouped.mrs)) == len(grouped)  # each MR decoded once
        if split in REAL_MRS:
            assert len(grouped) == REAL_MRS[split]


@pytest.mark.slow
def test_real_test_set_pads_little_with_fine_buckets(tokenizer) -> None:
    rows = e2e.tokenize_causal(e2e.load_e2e("test", _real_dir()), tokenizer)
    lengths = rows["attention_mask"].sum(axis=1)
    fine = e2e.padding_fraction(lengths, 8, e2e.length_buckets(lengths, 8))
    coarse = e2e.padding_fraction(lengths, 8, default_buckets(rows["input_ids"].shape[1]))
    print(f"E2E test rows, batch 8: padding {fine:.3f} with 8-token buckets, {coarse:.3f} with powers of two")
    assert fine < 0.12 < coarse


@pytest.mark.slow
def test_real_test_groups_are_the_official_csvs() -> None:
    # The challenge's own testset_w_refs.csv (another MR notation, untokenised references) groups the same 630
    # MRs in the same order with the same references: only the spacing around punctuation differs.
    import csv

    official_csv = _real_dir() / "official_csv" / "testset_w_refs.csv"
    if not official_csv.is_file():
        pytest.skip(f"no {official_csv}")
    official: dict[str, list[str]] = {}
    with official_csv.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            official.setdefault(row["mr"], []).append(row["ref"])
    ours = e2e.group_by_mr(e2e.load_e2e("test", _real_dir())).references
    assert len(ours) == len(official) == REAL_MRS["test"]
    for mine, theirs in zip(ours, official.values(), strict=True):
        assert [r.replace(" ", "") for r in mine] == [r.replace(" ", "") for r in theirs]
