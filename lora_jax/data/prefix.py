"""Prefix tuning's special tokens put into token arrays: l_p prefix tokens before the input, l_i infix tokens
after its first text (the model side is lora_jax.prefix).

Their ids are just past the model's vocabulary, V .. V + l_p + l_i - 1 (prefix first), so no real token is
displaced. Where they go:

    classification  [CLS] P..P text_a I..I [SEP] text_b [SEP]   after the tokenizer's leading special token (if
                                                                any), infix after the first text: between the
                                                                sentences of a pair, after a single sentence
    E2E (causal)    P..P MR eos I..I reference eos               infix appended to the prompt (MR and eos), as
                                                                Li & Liang's [x; INFIX; y]

Inserted tokens are real tokens to the model: attention_mask 1, the token type of the token before them, and never
predicted (loss_mask 0). Rows stay right-padded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_jax.data.tasks import TextSplit

FILL = {"input_ids": None, "attention_mask": 1, "loss_mask": 0}  # None: the special ids; absent keys copy the left


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """The special tokens of a prefix-tuned model: the model's vocabulary size (its embedding rows), l_p, l_i."""

    vocab_size: int
    l_p: int
    l_i: int

    def __post_init__(self) -> None:
        if self.l_p < 0 or self.l_i < 0 or self.l_p + self.l_i == 0:
            raise ValueError(f"l_p={self.l_p}, l_i={self.l_i}: both must be >= 0 and at least one > 0.")

    @property
    def count(self) -> int:
        return self.l_p + self.l_i

    @property
    def prefix_ids(self) -> np.ndarray:
        return np.arange(self.vocab_size, self.vocab_size + self.l_p, dtype=np.int32)

    @property
    def infix_ids(self) -> np.ndarray:
        return np.arange(self.vocab_size + self.l_p, self.vocab_size + self.count, dtype=np.int32)


def insert_special(
    arrays: Mapping[str, np.ndarray], prefix_at: np.ndarray, infix_at: np.ndarray, tokens: SpecialTokens, pad_id: int
) -> dict[str, np.ndarray]:
    """`arrays` with the prefix inserted before column prefix_at[i] and the infix before column infix_at[i] of each
    row i (prefix_at <= infix_at, both positions of the original row), l_p + l_i columns wider.

    2-D arrays of the rows' width are token arrays: input_ids gets the special ids (padding: `pad_id`),
    attention_mask 1, loss_mask 0, any other (token_type_ids) the value to the left of the insertion point (0 at the
    start); 1-D arrays (labels) are kept as they are.
    """
    ids = np.asarray(arrays["input_ids"])
    rows, width = ids.shape
    prefix_at, infix_at = np.asarray(prefix_at)[:, None], np.asarray(infix_at)[:, None]
    if np.any(prefix_at > infix_at) or np.any(prefix_at < 0) or np.any(infix_at > width):
        raise ValueError("insert_special needs 0 <= prefix_at <= infix_at <= the rows' width in every row.")
    columns = np.arange(width)[None, :]
    dest = columns + tokens.l_p * (columns >= prefix_at) + tokens.l_i * (columns >= infix_at)
    k_p, k_i = np.arange(tokens.l_p)[None, :], np.arange(tokens.l_i)[None, :]
    prefix_cols, infix_cols = prefix_at + k_p, infix_at + tokens.l_p + k_i
    row_index = np.arange(rows)[:, None]
    out = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.ndim != 2 or value.shape != ids.shape:
            out[key] = value.copy()
            continue
        fill = FILL.get(key, "left")
        new = np.full((rows, width + tokens.count), pad_id if key == "input_ids" else 0, value.dtype)
        new[row_index, dest] = value
        for cols, at, special in (
            (prefix_cols, prefix_at, tokens.prefix_ids),
            (infix_cols, infix_at, tokens.infix_ids),
        ):  # noqa: E501
            if fill is None:
                new[row_index, cols] = special[None, :]
            elif fill == "left":
                left = np.where(at > 0, value[row_index, np.maximum(at - 1, 0)], 0)
                new[row_index, cols] = left
            else:
                new[row_index, cols] = fill
        out[key] = new
    return out


def tokenize_with_prefix(rows: TextSplit, tokenizer: Any, max_len: int, tokens: SpecialTokens) -> dict[str, np.ndarray]:
    """`lora_jax.data.tokenize` with the special tokens inserted: the texts are truncated to max_len - l_p - l_i
    tokens so that every row is exactly max_len wide, as without them."""
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no pad token; set tokenizer.pad_token = tokenizer.eos_token first"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("prefix tuning's data path needs a fast tokenizer (AutoTokenizer(..., use_fast=True)).")
    room = max_len - tokens.count
    if room < 2:
        raise ValueError(
            f"l_p + l_i = {tokens.count} special tokens leave {room} of data.max_len={max_len} for the text; "
            "raise data.max_len or use fewer special tokens."
        )
    enc = tokenizer(rows.text_a, rows.text_b, truncation=True, max_length=room, padding="max_length")
    arrays = {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    prefix_at, infix_at = np.zeros(len(rows), np.int64), np.zeros(len(rows), np.int64)
    for i in range(len(rows)):
        first = [j for j, s in enumerate(enc.sequence_ids(i)) if s == 0]
        prefix_at[i], infix_at[i] = (first[0], first[-1] + 1) if first else (0, 0)
    out = insert_special(arrays, prefix_at, infix_at, tokens, tokenizer.pad_token_id)
    out["labels"] = rows.labels.copy()
    return out


def insert_special_causal(
    arrays: Mapping[str, np.ndarray], tokens: SpecialTokens, pad_id: int
) -> dict[str, np.ndarray]:
    """E2E rows (`e2e.tokenize_causal`, or prompts from `e2e.tokenize_prompts`) with the prefix before the MR and
    the infix after the prompt (MR and eos): before the first loss_mask 1 of a training row, at the end of a
    prompt's real tokens."""
    if "loss_mask" in arrays:
        infix_at = np.argmax(np.asarray(arrays["loss_mask"]) > 0, axis=1)
    else:
        infix_at = np.asarray(arrays["attention_mask"]).sum(axis=1)
    return insert_special(arrays, np.zeros_like(infix_at), infix_at, tokens, pad_id)
