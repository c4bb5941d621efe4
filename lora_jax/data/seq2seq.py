"""Classification as text-to-text, for encoder-decoder models (T5, mT0): the model writes the label's name.

This is how the mT0 write-up fine-tunes with LoRA: the source is the sentence (T5-style "task col: text" for
pairs), the target is the label word ("positive", "equivalent", ...), the loss is token cross-entropy on the
target, and the score comes from *generating* an answer and reading it back as a label, so a model that writes
anything else is simply wrong. Any `ClassificationTask` with label names works: GLUE, rotten_tomatoes, `task=file`.

A tokenized split carries `labels` as target token ids (-100 past the end, ignored by the loss) with
`decoder_input_ids` (labels shifted right behind the decoder start token) and `decoder_attention_mask`; the
batcher crops those to their own length bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lora_jax.data.metrics import glue_metrics
from lora_jax.data.tasks import ClassificationTask, TextSplit, tokenize

IGNORE = -100  # target positions the loss skips (transformers' convention)


def label_words(spec: ClassificationTask, words: Sequence[str] | None = None) -> tuple[str, ...]:
    """The target text of each class: `words` if given, else the task's label names with '_' read as ' '."""
    if spec.num_labels == 1:
        raise ValueError(f"{spec.name} is a regression task; text-to-text training here needs classes.")
    words = tuple(words) if words else tuple(name.replace("_", " ") for name in spec.label_names)
    if len(words) != spec.num_labels or len(set(words)) != len(words):
        raise ValueError(f"{spec.name} needs {spec.num_labels} distinct label words, got {list(words)}.")
    return words


def source_texts(rows: TextSplit, spec: ClassificationTask, prefix: str | None = None) -> list[str]:
    """Single sentences as they are (after an optional prefix); pairs as '<task> <col a>: a <col b>: b'."""
    if rows.text_b is None:
        return [f"{prefix}{a}" if prefix else a for a in rows.text_a]
    col_a, col_b = spec.text_columns[:2]
    head = prefix if prefix is not None else f"{spec.name} "
    return [f"{head}{col_a}: {a} {col_b}: {b}" for a, b in zip(rows.text_a, rows.text_b, strict=True)]


def tokenize_text_to_text(
    rows: TextSplit,
    spec: ClassificationTask,
    tokenizer: Any,
    max_len: int,
    decoder_start_token_id: int,
    words: Sequence[str] | None = None,
    prefix: str | None = None,
    max_target_len: int | None = None,
) -> dict[str, np.ndarray]:
    """Source and target token arrays of a split (sources right-padded to max_len, targets to the longest
    label word + eos). Rows without a label (test splits) get an all-ignored target."""
    words = label_words(spec, words)
    source = TextSplit(rows.task, rows.split, source_texts(rows, spec, prefix), None, rows.labels)
    src = tokenize(source, tokenizer, max_len)
    width = max_target_len or max(len(ids) for ids in tokenizer(list(words))["input_ids"])  # each ends with eos
    word_ids = tokenizer(list(words), truncation=True, max_length=width, padding="max_length", return_tensors="np")
    word_labels = np.where(word_ids["attention_mask"] == 1, word_ids["input_ids"], IGNORE).astype(np.int32)
    # A row without a label (test splits) gets an all-ignored target.
    word_labels = np.concatenate([word_labels, np.full((1, width), IGNORE, np.int32)])
    labels = word_labels[np.asarray(rows.labels, np.int64)]  # label -1 picks the all-ignored row
    decoder_input_ids = np.concatenate([np.full((len(labels), 1), decoder_start_token_id, np.int32), labels[:, :-1]], 1)
    decoder_input_ids[decoder_input_ids == IGNORE] = tokenizer.pad_token_id
    return {
        "input_ids": src["input_ids"],
        "attention_mask": src["attention_mask"],
        "decoder_input_ids": decoder_input_ids,
        # Position i reads the start token or target i-1 and predicts target i: real where the target is.
        "decoder_attention_mask": (labels != IGNORE).astype(np.int32),
        "labels": labels,
    }


def read_labels(texts: Sequence[str], words: Sequence[str]) -> np.ndarray:
    """Class index of each generated text (surrounding space and case ignored), -1 if it names no class."""
    index = {w.strip().lower(): i for i, w in enumerate(words)}
    return np.asarray([index.get(t.strip().lower(), -1) for t in texts], np.int64)


def text_to_text_metrics(
    spec: ClassificationTask, tokenizer: Any, words: Sequence[str] | None = None
) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    """metrics(generated token ids, target token ids) -> the task's GLUE metrics on the classes read back, plus
    `exact_match` of the texts and `unparsed` (the share of generations that name no class)."""
    words = label_words(spec, words)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def decode(ids: np.ndarray) -> list[str]:
        ids = np.where(np.asarray(ids) == IGNORE, pad_id, ids)
        return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def metrics(generated: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        said, wanted = decode(generated), decode(targets)
        predicted, truth = read_labels(said, words), read_labels(wanted, words)
        scores = glue_metrics(spec, predicted, truth)
        scores["exact_match"] = float(np.mean([a == b for a, b in zip(said, wanted, strict=True)]))
        scores["unparsed"] = float(np.mean(predicted < 0))
        return scores

    return metrics
