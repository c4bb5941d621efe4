"""The nine GLUE tasks: what each one is, where its rows come from, and how they become token arrays.

Three sources give the same rows (same order, same label ids as Hugging Face `nyu-mll/glue`):
  tsv      <dir>/<FOLDER>/{train,dev,test}.tsv as written by GLUE's download_glue_data.py
  parquet  <dir>/<FOLDER>/hf_parquet/<split>/*.parquet (the hub's parquet export)
  hub      datasets.load_dataset("nyu-mll/glue", task)  (needs the network)

Split names are the hub's: "train", "validation", "test"; MNLI has "validation_matched",
"validation_mismatched", "test_matched", "test_mismatched". Test rows carry no labels: label -1.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

GLUE_DIR_ENV = "LORA_JAX_GLUE_DIR"
HUB_NAME = "nyu-mll/glue"


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    text_columns: the hub's column names for the one or two texts (also the parquet columns).
    tsv_text_columns / tsv_label_column: header names of the same fields in the GLUE TSVs (the TSVs name
        them differently, e.g. MRPC's "#1 String", STS-B's "score").
    tsv_headerless: (text position, label position) for TSVs without a header row (CoLA train/dev).
    label_names: class names in label-id order; empty for regression (STS-B).
    metrics: what `metrics.glue_metrics` reports; main_metric: the number the LoRA paper's Table 2 shows.
    """

    name: str
    folder: str
    text_columns: tuple[str, ...]
    tsv_text_columns: tuple[str, ...]
    tsv_label_column: str
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    dev_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)
    tsv_headerless: tuple[int, int] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names) or 1  # 1 output = regression, as in HF sequence classification

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", *self.dev_splits, *self.test_splits)


_ACC = ("accuracy",)
TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        # CoLA train/dev: no header; columns = source, label, original label (blank), sentence.
        GlueTask(
            "cola", "CoLA", ("sentence",), ("sentence",), "label", ("unacceptable", "acceptable"),
            ("mcc",), "mcc", tsv_headerless=(3, 1),
        ),
        GlueTask(
            "sst2", "SST-2", ("sentence",), ("sentence",), "label", ("negative", "positive"),
            _ACC, "accuracy",
        ),
        # MRPC header: Quality, #1 ID, #2 ID, #1 String, #2 String (starts with a UTF-8 BOM).
        GlueTask(
            "mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
            ("not_equivalent", "equivalent"), ("accuracy", "f1"), "accuracy",
        ),
        GlueTask(
            "qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
            ("not_duplicate", "duplicate"), ("accuracy", "f1"), "accuracy",
        ),
        # STS-B: 10 columns (index, genre, filename, year, old_index, source1, source2, sentence1, sentence2,
        # score); the score is a float in [0, 5].
        GlueTask(
            "stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", (),
            ("pearson", "spearman"), "pearson",
        ),
        GlueTask(
            "mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
            ("entailment", "neutral", "contradiction"), _ACC, "accuracy",
            dev_splits=("validation_matched", "validation_mismatched"),
            test_splits=("test_matched", "test_mismatched"),
        ),
        GlueTask(
            "qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
            ("entailment", "not_entailment"), _ACC, "accuracy",
        ),
        GlueTask(
            "rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
            ("entailment", "not_entailment"), _ACC, "accuracy",
        ),
        # WNLI labels are written as 0/1 in the TSV, and 1 means entailment.
        GlueTask(
            "wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
            ("not_entailment", "entailment"), _ACC, "accuracy",
        ),
    ]
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GlueSplit:
    """The rows of one split: texts, and labels (int32 class ids; float32 scores for STS-B; -1: unknown)."""

    task: str
    split: str
    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.text_a)


def get_task(task: str | GlueTask) -> GlueTask:
    if isinstance(task, GlueTask):  # a task defined elsewhere (lora_jax.data.text) passes through
        return task
    if task not in TASKS:
        raise ValueError(f"GLUE task {task!r} unknown; choose one of {', '.join(TASKS)}")
    return TASKS[task]


def _check_split(spec: GlueTask, split: str) -> None:
    if split not in spec.splits:
        choices = ", ".join(spec.splits)
        raise ValueError(f"GLUE task {spec.name!r} has no split {split!r}; choose one of {choices}")


def _tsv_name(split: str) -> str:
    """train -> train.tsv, validation -> dev.tsv, validation_matched -> dev_matched.tsv"""
    return split.replace("validation", "dev") + ".tsv"


def _label_array(spec: GlueTask, raw: Sequence[Any]) -> np.ndarray:
    """Label strings/numbers -> ids as the hub's glue builder makes them; None/'' (unlabelled) -> -1."""
    if spec.is_regression:
        return np.array([-1.0 if v is None or v == "" else float(v) for v in raw], np.float32)
    ids = [
        -1 if v is None or v == "" else spec.label_names.index(v) if v in spec.label_names else int(v)
        for v in raw
    ]
    return np.array(ids, np.int32)


def read_glue_tsv(path: str | os.PathLike, spec: GlueTask) -> tuple[list[list[str]], np.ndarray]:
    """Texts (one list per text column) and labels of one GLUE TSV.

    Quoting is off (csv.QUOTE_NONE): the files contain unbalanced `"` characters that a quoting reader would
    treat as field delimiters, silently merging rows.
    """
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig drops MRPC's byte-order mark
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    if not rows:
        raise ValueError(f"{path} is empty; is it the right file?")
    first_row = 1
    if spec.tsv_headerless is not None and rows[0][0] != "index":  # CoLA test.tsv does have a header
        text_pos, label_pos = spec.tsv_headerless
        positions, label_at = [text_pos], label_pos
    else:
        header, rows, first_row = rows[0], rows[1:], 2
        try:
            positions = [header.index(c) for c in spec.tsv_text_columns]
        except ValueError:
            raise ValueError(f"{path}: expected columns {spec.tsv_text_columns} in header {header}") from None
        label_at = header.index(spec.tsv_label_column) if spec.tsv_label_column in header else None
    needed = max(positions + ([label_at] if label_at is not None else []))
    for line, row in enumerate(rows, start=first_row):
        if len(row) <= needed:
            raise ValueError(f"{path}: row {line} has {len(row)} fields, needs {needed + 1}; is it intact?")
    texts = [[row[p] for row in rows] for p in positions]
    return texts, _label_array(spec, [row[label_at] if label_at is not None else None for row in rows])


def _read_parquet(files: list[Path], spec: GlueTask) -> tuple[list[list[str]], np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f) for f in files])
    texts = [table.column(c).to_pylist() for c in spec.text_columns]
    return texts, _label_array(spec, table.column("label").to_pylist())


def _read_hub(spec: GlueTask, split: str) -> tuple[list[list[str]], np.ndarray]:
    import datasets

    try:
        ds = datasets.load_dataset(HUB_NAME, spec.name, split=split)
    except Exception as e:  # offline, or a hub error: say what to do instead
        raise ConnectionError(
            f"Could not load {HUB_NAME}/{spec.name} from the Hugging Face hub ({type(e).__name__}); offline? "
            f"Pass data.dir=<folder with {spec.folder}/{_tsv_name(split)}> or set {GLUE_DIR_ENV}"
        ) from e
    return [ds[c] for c in spec.text_columns], _label_array(spec, ds["label"])


def load_glue(
    task: str, split: str, data_dir: str | os.PathLike | None = None, source: str = "auto"
) -> GlueSplit:
    """Rows of one GLUE split.

    data_dir falls back to $LORA_JAX_GLUE_DIR; with neither, rows come from the hub. source "auto" prefers the
    TSV, then the parquet export; "tsv", "parquet" or "hub" force one.
    """
    spec = get_task(task)
    _check_split(spec, split)
    if source not in ("auto", "tsv", "parquet", "hub"):
        raise ValueError(f"GLUE source {source!r} unknown; choose one of auto, tsv, parquet, hub")
    data_dir = data_dir or os.environ.get(GLUE_DIR_ENV) or None
    if source == "hub" or (source == "auto" and data_dir is None):
        texts, labels = _read_hub(spec, split)
    else:
        if data_dir is None:
            raise FileNotFoundError(
                f"No GLUE data directory given: pass data.dir=<folder with {spec.folder}/{_tsv_name(split)}> "
                f"or set {GLUE_DIR_ENV}"
            )
        folder = Path(data_dir).expanduser() / spec.folder
        tsv = folder / _tsv_name(split)
        parquet = sorted((folder / "hf_parquet" / split).glob("*.parquet"))
        if source in ("auto", "tsv") and tsv.is_file():
            texts, labels = read_glue_tsv(tsv, spec)
        elif source in ("auto", "parquet") and parquet:
            texts, labels = _read_parquet(parquet, spec)
        else:
            raise FileNotFoundError(
                f"No GLUE data for {spec.folder} split {split!r} under {data_dir}: pass "
                f"data.dir=<folder with {spec.folder}/{tsv.name} or {spec.folder}/hf_parquet/{split}/> "
                f"or set {GLUE_DIR_ENV}"
            )
    if split not in spec.test_splits and (labels == -1).any():
        raise ValueError(
            f"GLUE {spec.name} {split}: {(labels == -1).sum()} rows have no label; check the files"
        )
    return GlueSplit(spec.name, split, texts[0], texts[1] if spec.is_pair else None, labels)


def tokenize(rows: GlueSplit, tokenizer: Any, max_len: int) -> dict[str, np.ndarray]:
    """Token arrays of a split, right-padded to exactly max_len so every split shares one width.

    Returns int32 input_ids, attention_mask, token_type_ids (when the tokenizer makes them) of shape
    (n, max_len), and labels. Batching later crops each batch to a short bucket length.
    """
    enc = tokenizer(rows.text_a, rows.text_b, truncation=True, max_length=max_len, return_attention_mask=True)
    pad_values = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0, "token_type_ids": 0}
    out = {}
    for key, pad in pad_values.items():
        if key not in enc:
            continue
        seqs = enc[key]
        arr = np.full((len(seqs), max_len), pad, np.int32)
        for i, seq in enumerate(seqs):
            arr[i, : len(seq)] = seq
        out[key] = arr
    out["labels"] = rows.labels.copy()
    return out
