"""The E2E NLG Challenge (Novikova et al. 2017) as a causal-LM task: the LoRA paper's Table 3 data.

Files are microsoft/LoRA's `examples/NLG/data/e2e/{train,valid,test}.txt`: one `MR||reference` pair a line
(42,061 / 4,672 / 4,693 lines), where MR is the meaning representation (`name : The Vaults | Type : pub | ...`).
The folder comes from `data_dir`, else from $LORA_JAX_E2E_DIR.

Training rows follow LoRA's `gpt2_encode.py`: context = the MR, completion = " " + the reference, each followed
by the tokenizer's end-of-text token, so the model learns to read an MR, see the separator, write a reference
and stop:

    input_ids  = MR tokens, eos, reference tokens, eos, pad...
    loss_mask  = 0 ...   0,   0, 1 ...          1,   1, 0 ...     (the completion and its final eos)

`loss_mask[t]` marks the tokens that are predicted: the loss is cross-entropy of logits[t - 1] against
input_ids[t] wherever loss_mask[t] is 1 (shift left by one, as `logits[:, :-1]` vs `input_ids[:, 1:]`).

Evaluation decodes each distinct MR once and scores it against all its references (`group_by_mr`; the test set
has 630 MRs): the prompt is the MR tokens and eos, exactly the context seen in training.

Padding: rows are length-bucketed rather than packed (packing needs per-segment attention masks and positions,
which the model's 2-D attention mask cannot express). `lora_jax.data.batching` sorts rows by length within
pools of batches and crops each batch to a bucket; `length_buckets` gives fine-grained buckets for these short
rows and `padding_fraction` reports what is still wasted.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax.data.batching import bucket_length, epoch_plan

E2E_DIR_ENV = "LORA_JAX_E2E_DIR"
GPT2_TOKENIZER_ENV = "LORA_JAX_GPT2_TOKENIZER"
SPLIT_FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}
SEPARATOR = "||"


@dataclasses.dataclass(frozen=True)
class E2ESplit:
    """One file's rows: mrs[i] is the meaning representation of references[i] (MRs repeat, one row each)."""

    mrs: tuple[str, ...]
    references: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.mrs)


@dataclasses.dataclass(frozen=True)
class GroupedReferences:
    """Distinct MRs in order of first appearance, with all references of each: what evaluation scores."""

    mrs: tuple[str, ...]
    references: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.mrs)


def e2e_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding train.txt / valid.txt / test.txt: `data_dir`, else $LORA_JAX_E2E_DIR."""
    folder = data_dir or os.environ.get(E2E_DIR_ENV)
    if not folder:
        raise ValueError(f"no E2E folder: pass data_dir (data.dir=...) or set {E2E_DIR_ENV}.")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"E2E folder {folder} does not exist; point data.dir or {E2E_DIR_ENV} at it.")
    return folder


def load_e2e(split: str, data_dir: str | os.PathLike | None = None) -> E2ESplit:
    """The rows of one split ("train", "validation" or "test")."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown E2E split {split!r}; use one of {sorted(SPLIT_FILES)}.")
    path = e2e_dir(data_dir) / SPLIT_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the E2E folder needs {', '.join(SPLIT_FILES.values())}.")
    mrs, refs = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        mr, sep, ref = line.partition(SEPARATOR)
        if not sep or not mr.strip() or not ref.strip():
            raise ValueError(f"{path}:{number} is not an `MR||reference` line: {line[:80]!r}")
        mrs.append(mr.strip())
        refs.append(ref.strip())
    return E2ESplit(tuple(mrs), tuple(refs))


def group_by_mr(split: E2ESplit) -> GroupedReferences:
    """Each distinct MR once (first-appearance order) with every reference written for it."""
    groups: dict[str, list[str]] = {}
    for mr, ref in zip(split.mrs, split.references, strict=True):
        groups.setdefault(mr, []).append(ref)
    return GroupedReferences(tuple(groups), tuple(tuple(refs) for refs in groups.values()))


def gpt2_tokenizer(path: str | os.PathLike | None = None) -> Any:
    """The GPT-2 BPE tokenizer from `path`, else from $LORA_JAX_GPT2_TOKENIZER."""
    from transformers import AutoTokenizer

    folder = path or os.environ.get(GPT2_TOKENIZER_ENV)
    if not folder:
        raise ValueError(f"no GPT-2 tokenizer folder: pass one or set {GPT2_TOKENIZER_ENV}.")
    return AutoTokenizer.from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------------------------
# Token arrays
# ---------------------------------------------------------------------------------------------------------------


def end_of_text_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-text (eos) token; E2E rows need one as separator and end.")
    return int(eos)


def pad_id(tokenizer: Any) -> int:
    """The id right-padding uses: the tokenizer's pad token, else its end-of-text token (GPT-2 has no pad)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else end_of_text_id(tokenizer)


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def tokenize_causal(split: E2ESplit, tokenizer: Any, max_len: int | None = None) -> dict[str, np.ndarray]:
    """Right-padded `input_ids`, `attention_mask` and `loss_mask` (int32) for causal-LM training.

    The width is max_len (default: the longest row); a row longer than max_len is an error, not a silent cut.
    Padding uses the tokenizer's pad token (eos when it has none); padded positions have both masks 0.
    """
    eos = end_of_text_id(tokenizer)
    contexts = _encode(tokenizer, split.mrs)
    completions = _encode(tokenizer, [" " + ref for ref in split.references])
    rows = [(c + [eos], r + [eos]) for c, r in zip(contexts, completions, strict=True)]
    longest = max(len(c) + len(r) for c, r in rows)
    width = max_len or longest
    if longest > width:
        raise ValueError(f"an E2E row has {longest} tokens, more than max_len {width}; raise data.max_len.")
    input_ids = np.full((len(rows), width), pad_id(tokenizer), np.int32)
    attention_mask = np.zeros((len(rows), width), np.int32)
    loss_mask = np.zeros((len(rows), width), np.int32)
    for i, (context, completion) in enumerate(rows):
        n, m = len(context), len(completion)
        input_ids[i, : n + m] = context + completion
        attention_mask[i, : n + m] = 1
        loss_mask[i, n : n + m] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def tokenize_prompts(mrs: Sequence[str], tokenizer: Any) -> dict[str, np.ndarray]:
    """Right-padded decoding prompts: each MR's tokens then eos (the training context), as int32 arrays."""
    eos = end_of_text_id(tokenizer)
    return right_padded([ids + [eos] for ids in _encode(tokenizer, mrs)], pad_id(tokenizer))


def right_padded(sequences: Sequence[Sequence[int]], pad: int) -> dict[str, np.ndarray]:
    """Token lists as int32 `input_ids` right-padded with `pad` to the longest, and their `attention_mask`.
    (GPT-2-style tokenizers have no pad token, so `tokenizer.pad` cannot do this for them.)"""
    width = max(len(s) for s in sequences)
    input_ids = np.full((len(sequences), width), pad, np.int32)
    attention_mask = np.zeros((len(sequences), width), np.int32)
    for i, ids in enumerate(sequences):
        input_ids[i, : len(ids)], attention_mask[i, : len(ids)] = ids, 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def completion_texts(generated: np.ndarray, tokenizer: Any) -> list[str]:
    """Generated continuations (batch, new tokens) as text: each cut at its first eos, stripped."""
    eos = end_of_text_id(tokenizer)
    texts = []
    for row in np.asarray(generated).tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


# ---------------------------------------------------------------------------------------------------------------
# Padding
# ---------------------------------------------------------------------------------------------------------------


def length_buckets(lengths: np.ndarray, step: int = 8) -> tuple[int, ...]:
    """Multiples of `step` from the shortest row up, ending at the longest row's length (as `default_buckets`
    ends at max_len): few shapes to compile, little padding. [20, 33, 115], 8 -> (24, 32, ..., 112, 115)."""
    lengths = np.asarray(lengths)
    if step < 1 or not len(lengths):
        raise ValueError("length_buckets needs step >= 1 and at least one row.")
    longest = int(lengths.max())
    low = max(-(-int(lengths.min()) // step) * step, step)
    return (*range(low, longest, step), longest)


def padding_fraction(
    lengths: np.ndarray,
    batch_size: int,
    buckets: Sequence[int],
    *,
    seed: int = 0,
    epoch: int = 0,
    pool_batches: int = 50,
    drop_last: bool = False,
) -> float:
    """The share of token slots that are padding in one epoch of `batching.epoch_batches` with these settings.

    Each batch is batch_size rows (a short last batch is filled up with weight-0 rows, which count as padding)
    cropped to the bucket of its longest row, exactly as `batching.take` builds it.
    """
    lengths = np.asarray(lengths)
    plan = epoch_plan(lengths, batch_size, seed, epoch, pool_batches, drop_last)
    slots = real = 0
    for indices in plan:
        slots += batch_size * bucket_length(int(lengths[indices].max()), buckets)
        real += int(lengths[indices].sum())
    return 1.0 - real / slots if slots else 0.0
