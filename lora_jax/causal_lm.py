"""Causal-LM fine-tuning on E2E NLG (the paper's Table 3) through the shared trainer, and its beam-search evaluation.

Training loops and checkpoints live in `lora_jax.train.train`, as for GLUE. This module says what a causal-LM run
feeds it:

  training rows   `e2e.tokenize_causal` rows with `labels[t]` = the token at t + 1 where that token is part of the
                  completion, else -100, so `objective.batch_loss`'s token branch is the completion-only loss
                  (label-smoothed by optim.label_smoothing); rows are length-bucketed (`e2e.length_buckets`).
  evaluation      each distinct MR of the split once (`e2e.group_by_mr`) as a prompt; `EvalSpec.generate` beam-decodes
                  a batch of them under jit with a KV cache (`lora_jax.models.generate`, settings from
                  `DecodeConfig`), and `EvalSpec.metrics` turns tokens into text and scores them with the E2E
                  challenge's five metrics (`nlg_metrics.e2e_metrics`). It also returns the texts, which the trainer
                  writes to decoded/<split>_epoch<k>.txt, and a few samples, which it logs.

Outside a training run, `decode_all` decodes a whole prompt set, resumably (experiments/e2e_decode.py on a trained
adapter); `fewshot` decodes the base model with a few training pairs in the prompt: the floor a fine-tuned run must
beat.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lora_jax.checkpoint import kept_outputs
from lora_jax.data import e2e
from lora_jax.data.batching import eval_batches, subset_indices
from lora_jax.data.nlg_metrics import e2e_metrics
from lora_jax.data.prefix import SpecialTokens, insert_special_causal
from lora_jax.models import generate as decoding
from lora_jax.models.spec import family_of
from lora_jax.train import EvalSpec

IGNORE = -100
MAIN_METRIC = "BLEU"


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How evaluation decodes (the Hydra `generate` group's schema is generated from these fields).

    Defaults are Table 11's E2E column. `max_mrs` scores only the first MRs of the split (a quicker check on a CPU;
    null, the default, scores them all). `samples` decoded outputs go into the logs each epoch. `shots` training
    pairs precede each MR in `fewshot`'s prompt. `ngram_over_prompt` false is the paper's decoder (microsoft/LoRA
    gpt2_beam.py bans only n-grams the output itself repeats); true is transformers' rule, which also bans the
    MR's n-grams and so forbids copying a name of 4+ tokens ("The Vaults" comes out as "TheVaults").
    """

    split: str = "test"
    num_beams: int = 10
    length_penalty: float = 0.9
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64
    max_mrs: int | None = None
    samples: int = 10
    shots: int = 3
    ngram_over_prompt: bool = False

    def __post_init__(self) -> None:
        if self.split not in e2e.SPLIT_FILES:
            raise ValueError(f"generate.split must be one of {sorted(e2e.SPLIT_FILES)}, got {self.split!r}.")
        for name in ("num_beams", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"generate.{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_mrs is not None and self.max_mrs < 1:
            raise ValueError(f"generate.max_mrs must be >= 1 (or null: every MR), got {self.max_mrs}.")


# ---------------------------------------------------------------------------------------------------------------
# Training rows
# ---------------------------------------------------------------------------------------------------------------


def next_token_labels(input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """labels[:, t] = input_ids[:, t + 1] where loss_mask[:, t + 1], else -100: what logits[:, t] must predict."""
    labels = np.where(loss_mask[:, 1:] > 0, input_ids[:, 1:], IGNORE)
    return np.concatenate([labels, np.full((len(labels), 1), IGNORE, labels.dtype)], axis=1).astype(np.int32)


def train_subset(split: e2e.E2ESplit, rows: int | None, seed: int = 0) -> e2e.E2ESplit:
    """`rows` training pairs drawn without replacement by `seed` (in file order), or the whole split."""
    keep = subset_indices(len(split), rows, seed)
    if len(keep) == len(split):
        return split
    return e2e.E2ESplit(tuple(split.mrs[i] for i in keep), tuple(split.references[i] for i in keep))


def causal_rows(
    split: e2e.E2ESplit, tokenizer: Any, max_len: int, special: SpecialTokens | None = None
) -> dict[str, np.ndarray]:
    """input_ids, attention_mask and next-token labels, as wide as the longest row (at most max_len, plus prefix
    tuning's `special` tokens: the prefix before the MR, the infix before the reference)."""
    data = e2e.tokenize_causal(split, tokenizer, max_len)
    longest = int(data["attention_mask"].sum(axis=1).max())
    data = {k: v[:, :longest] for k, v in data.items()}
    if special is not None:
        data = insert_special_causal(data, special, e2e.pad_id(tokenizer))
    labels = next_token_labels(data["input_ids"], data["loss_mask"])
    return {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"], "labels": labels}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def prompt_set(prompts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Prompts as an eval dataset: `labels` are the item numbers, which the scorer reads its references by."""
    return {**prompts, "labels": np.arange(len(prompts["input_ids"]), dtype=np.int32)}


def decoder(decode: DecodeConfig, eos: Sequence[int], pad: int) -> Callable[[Any, Any, Any], jax.Array]:
    """`EvalSpec.generate`: (module, params, batch) -> (batch, max_new_tokens) tokens, by the family's CausalLM."""

    def generate_batch(module: Any, params: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> jax.Array:
        lm = family_of(module.config).causal_lm(module)
        return decoding.generate(
            lm, params, batch["input_ids"], batch["attention_mask"], max_new_tokens=decode.max_new_tokens,
            eos_token_id=list(eos), pad_token_id=pad, num_beams=decode.num_beams,
            length_penalty=decode.length_penalty, no_repeat_ngram_size=decode.no_repeat_ngram_size,
            ngram_over_prompt=decode.ngram_over_prompt,
        )  # fmt: skip

    return generate_batch


def decode_all(
    generate: Callable[[Any, Mapping[str, Any]], Any],
    params: Any,
    dataset: Mapping[str, np.ndarray],
    batch_size: int,
    keep: str | os.PathLike | None = None,
) -> np.ndarray:
    """Every row's generated tokens (rows, new tokens), in row order, from `generate(params, batch)`.

    With `keep` (a folder), batch i is saved there as i.npy once decoded and read back on a rerun, so a killed
    decode of a whole test set resumes where it stopped (`checkpoint.kept_outputs`)."""

    def decode(batch: Mapping[str, np.ndarray]) -> np.ndarray:
        out = np.asarray(generate(params, {k: batch[k] for k in ("input_ids", "attention_mask")}))
        return out[batch["weights"] > 0]

    tokens = kept_outputs(decode, eval_batches(dataset, batch_size), keep)
    width = max(t.shape[1] for t in tokens)
    return np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]))) for t in tokens])


def scorer(
    grouped: e2e.GroupedReferences, tokenizer: Any, samples: int = 10, stop: str | None = None
) -> Callable[[np.ndarray, np.ndarray], dict[str, Any]]:
    """`EvalSpec.metrics`: generated tokens (in item order) -> the five E2E scores, plus "decoded" (every text, a
    line each, the official scorer's system-output format) and "samples" (the first few beside a reference).
    `stop`: text after it is cut off (the few-shot prompt's line break)."""

    def metrics(tokens: np.ndarray, items: np.ndarray) -> dict[str, Any]:
        texts = e2e.completion_texts(tokens, tokenizer)
        if stop is not None:
            texts = [t.split(stop, 1)[0].strip() for t in texts]
        texts = [" ".join(t.split()) for t in texts]  # one line each, whatever the model wrote
        refs = [grouped.references[i] for i in items]
        scores: dict[str, Any] = dict(e2e_metrics(texts, refs))
        scores["decoded"] = texts
        scores["samples"] = [
            {"mr": grouped.mrs[i], "output": t, "reference": grouped.references[i][0]}
            for i, t in zip(items[:samples], texts[:samples], strict=True)
        ]
        return scores

    return metrics


def eval_references(data_dir: str | None, decode: DecodeConfig) -> e2e.GroupedReferences:
    """The split's distinct MRs with their references (the first `max_mrs` of them, if set)."""
    grouped = e2e.group_by_mr(e2e.load_e2e(decode.split, data_dir))
    if decode.max_mrs is not None:
        grouped = e2e.GroupedReferences(grouped.mrs[: decode.max_mrs], grouped.references[: decode.max_mrs])
    return grouped


def e2e_datasets(
    data: Mapping[str, Any], decode: DecodeConfig, tokenizer: Any, special: SpecialTokens | None = None
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], EvalSpec, tuple[int, ...]]:
    """(train set, {split: prompts}, EvalSpec, training buckets) for `train.train`.

    `data` keys: dir, max_len, bucket_step, train_examples, subset_seed (as lora_jax.config.DataSchema has them).
    `special`: prefix tuning's tokens, put into training rows and decoding prompts alike.
    """
    split = train_subset(e2e.load_e2e("train", data.get("dir")), data.get("train_examples"), data.get("subset_seed", 0))
    train_set = causal_rows(split, tokenizer, data.get("max_len") or 512, special)
    buckets = e2e.length_buckets(train_set["attention_mask"].sum(axis=1), data.get("bucket_step") or 8)
    grouped = eval_references(data.get("dir"), decode)
    eos = e2e.end_of_text_id(tokenizer)
    pad = e2e.pad_id(tokenizer)
    spec = EvalSpec(
        num_labels=0,  # unused: the labels are tokens (objective.batch_loss's token branch)
        metrics=scorer(grouped, tokenizer, decode.samples), main_metric=MAIN_METRIC,
        generate=decoder(decode, [eos], pad),
    )  # fmt: skip
    prompts = e2e.tokenize_prompts(grouped.mrs, tokenizer)
    if special is not None:
        prompts = insert_special_causal(prompts, special, pad)
    return train_set, {decode.split: prompt_set(prompts)}, spec, buckets


def keep_best_outputs(out_dir: str | os.PathLike, split: str, best_epoch: int | None) -> str | None:
    """Copy the best epoch's decoded texts to <out_dir>/<split>_outputs.txt (the run's one output file)."""
    if best_epoch is None:
        return None
    source = Path(out_dir) / "decoded" / f"{split}_epoch{best_epoch}.txt"
    if not source.exists():
        return None
    target = Path(out_dir) / f"{split}_outputs.txt"
    shutil.copyfile(source, target)
    return target.name


# ---------------------------------------------------------------------------------------------------------------
# The few-shot floor
# ---------------------------------------------------------------------------------------------------------------

FEWSHOT_INSTRUCTION = "Write one sentence about the restaurant described by each list of attributes.\n\n"


def fewshot_prompt(shots: Sequence[tuple[str, str]], mr: str) -> str:
    """The instruction, `shots` (MR, reference) pairs, then the MR to describe, each as `MR\\nSentence: text`."""
    return FEWSHOT_INSTRUCTION + "".join(f"{m}\nSentence: {r}\n\n" for m, r in shots) + f"{mr}\nSentence:"


def newline_tokens(tokenizer: Any) -> list[int]:
    """Ids of the vocabulary entries that decode to line breaks only: where a few-shot answer ends."""
    ids = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text and set(text) == {"\n"}:
            ids.append(token_id)
    return ids


def fewshot(
    module: Any,
    params: Any,
    tokenizer: Any,
    data_dir: str | None,
    decode: DecodeConfig,
    out_dir: str | os.PathLike,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Decode every MR of `decode.split` with `decode.shots` training pairs in the prompt, score, and write
    <out_dir>/<split>_outputs.txt and metrics.jsonl; returns the scores (and the texts under "decoded"). Decoded
    batches are kept in <out_dir>/batches, so a rerun resumes."""

    train = e2e.load_e2e("train", data_dir)
    picks = np.random.default_rng(seed).choice(len(train), decode.shots, replace=False)
    shots = [(train.mrs[i], train.references[i]) for i in picks]
    grouped = eval_references(data_dir, decode)
    encoded = [tokenizer(fewshot_prompt(shots, mr), add_special_tokens=False)["input_ids"] for mr in grouped.mrs]
    eos, pad = e2e.end_of_text_id(tokenizer), e2e.pad_id(tokenizer)
    dataset = prompt_set(e2e.right_padded(encoded, pad))
    generate_batch = decoder(decode, [eos, *newline_tokens(tokenizer)], pad)
    generate = jax.jit(lambda p, b: generate_batch(module, p, b))
    out_dir = Path(out_dir)
    tokens = decode_all(generate, params, dataset, batch_size, keep=out_dir / "batches")
    scores = scorer(grouped, tokenizer, decode.samples, stop="\n")(tokens, dataset["labels"])
    (out_dir / f"{decode.split}_outputs.txt").write_text("\n".join(scores["decoded"]) + "\n")
    record = {k: v for k, v in scores.items() if k != "decoded"}
    (out_dir / "metrics.jsonl").write_text(json.dumps({"step": 0, "epoch": 0, "shots": shots, **record}) + "\n")
    return scores
