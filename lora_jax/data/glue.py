"""The nine GLUE tasks: what each one is and where its rows come from.

Three sources give the same rows (same order, same label ids as Hugging Face `nyu-mll/glue`):
  tsv      <dir>/<FOLDER>/{train,dev,test}.tsv as written by GLUE's download_glue_data.py
  parquet  <dir>/<FOLDER>/hf_parquet/<split>/*.parquet (the hub's parquet export)
  hub      datasets.load_dataset("nyu-mll/glue", task)  (needs the network)

Split names are the hub's: "train", "validation", "test"; MNLI has "validation_matched",
"validation_mismatched", "test_matched", "test_mismatched". Test rows carry no labels. Every source goes through
`tasks.read_table` / `tasks.read_hub` and `tasks.rows_from_table`, as text tasks and your own files do.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lora_jax.data.tasks import (
    ClassificationTask,
    TextSplit,
    read_hub,
    read_table,
    read_tables,
    rows_from_table,
    tokenize,
)

GLUE_DIR_ENV = "LORA_JAX_GLUE_DIR"
HUB_NAME = "nyu-mll/glue"
__all__ = ["GLUE_DIR_ENV", "TASKS", "TSV_LAYOUTS", "get_task", "load_glue", "tokenize"]


@dataclasses.dataclass(frozen=True)
class TsvLayout:
    """Where a GLUE task's fields sit in its download_glue_data.py TSVs (they name them unlike the hub).

    headerless: names for the columns of the splits whose TSV has no header row (CoLA train/dev).
    """

    folder: str
    text_columns: tuple[str, ...]
    label_column: str
    headerless: tuple[str, ...] | None = None
    headerless_splits: tuple[str, ...] = ("train", "validation")


def _glue(
    name: str,
    text_columns: tuple[str, ...],
    label_names: tuple[str, ...],
    metrics: tuple[str, ...] = ("accuracy",),
    **splits: tuple[str, ...],
) -> ClassificationTask:
    return ClassificationTask(name, text_columns, label_names, metrics, metrics[0], **splits)


_PAIR = ("sentence1", "sentence2")
TASKS: dict[str, ClassificationTask] = {
    t.name: t
    for t in [
        _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("mcc",)),
        _glue("sst2", ("sentence",), ("negative", "positive")),
        _glue("mrpc", _PAIR, ("not_equivalent", "equivalent"), ("accuracy", "f1")),
        _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1")),
        _glue("stsb", _PAIR, (), ("pearson", "spearman")),  # regression: a score in [0, 5]
        _glue(
            "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
            dev_splits=("validation_matched", "validation_mismatched"),
            test_splits=("test_matched", "test_mismatched"),
        ),
        _glue("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
        _glue("rte", _PAIR, ("entailment", "not_entailment")),
        _glue("wnli", _PAIR, ("not_entailment", "entailment")),  # written 0/1 in the TSV; 1 means entailment
    ]
}  # fmt: skip

TSV_LAYOUTS: dict[str, TsvLayout] = {
    # CoLA train/dev: no header; columns = source, label, original label (blank), sentence. test.tsv has one.
    "cola": TsvLayout("CoLA", ("sentence",), "label", headerless=("source", "label", "original_label", "sentence")),
    "sst2": TsvLayout("SST-2", ("sentence",), "label"),
    # MRPC header: Quality, #1 ID, #2 ID, #1 String, #2 String (starts with a UTF-8 BOM).
    "mrpc": TsvLayout("MRPC", ("#1 String", "#2 String"), "Quality"),
    "qqp": TsvLayout("QQP", ("question1", "question2"), "is_duplicate"),
    # STS-B: index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score.
    "stsb": TsvLayout("STS-B", _PAIR, "score"),
    "mnli": TsvLayout("MNLI", _PAIR, "gold_label"),
    "qnli": TsvLayout("QNLI", ("question", "sentence"), "label"),
    "rte": TsvLayout("RTE", _PAIR, "label"),
    "wnli": TsvLayout("WNLI", _PAIR, "label"),
}


def get_task(task: str | ClassificationTask) -> ClassificationTask:
    if isinstance(task, ClassificationTask):  # a task defined elsewhere (lora_jax.data.text) passes through
        return task
    if task not in TASKS:
        raise ValueError(f"GLUE task {task!r} unknown; choose one of {', '.join(TASKS)}")
    return TASKS[task]


def _tsv_name(split: str) -> str:
    """train -> train.tsv, validation -> dev.tsv, validation_matched -> dev_matched.tsv"""
    return split.replace("validation", "dev") + ".tsv"


def load_glue(task: str, split: str, data_dir: str | os.PathLike | None = None, source: str = "auto") -> TextSplit:
    """Rows of one GLUE split.

    data_dir falls back to $LORA_JAX_GLUE_DIR; with neither, rows come from the hub. source "auto" prefers the
    TSV, then the parquet export; "tsv", "parquet" or "hub" force one.
    """
    spec = get_task(task)
    spec.check_split(split)
    if source not in ("auto", "tsv", "parquet", "hub"):
        raise ValueError(f"GLUE source {source!r} unknown; choose one of auto, tsv, parquet, hub")
    layout = TSV_LAYOUTS[spec.name]
    data_dir = data_dir or os.environ.get(GLUE_DIR_ENV) or None
    fix = f"pass data.dir=<folder with {layout.folder}/{_tsv_name(split)}> or set {GLUE_DIR_ENV}"
    if source == "hub" or (source == "auto" and data_dir is None):
        return rows_from_table(spec, split, read_hub(HUB_NAME, spec.name, split, fix[0].upper() + fix[1:]), HUB_NAME)
    if data_dir is None:
        raise FileNotFoundError(f"No GLUE data directory given: {fix}")
    folder = Path(data_dir).expanduser() / layout.folder
    tsv = folder / _tsv_name(split)
    parquet = sorted((folder / "hf_parquet" / split).glob("*.parquet"))
    if source in ("auto", "tsv") and tsv.is_file():
        names = layout.headerless if split in layout.headerless_splits else None
        return rows_from_table(spec, split, read_table(tsv, names), str(tsv), layout.text_columns, layout.label_column)
    if source in ("auto", "parquet") and parquet:
        return rows_from_table(spec, split, read_tables(parquet), str(parquet[0]))
    raise FileNotFoundError(
        f"No GLUE data for {layout.folder} split {split!r} under {data_dir}: pass "
        f"data.dir=<folder with {layout.folder}/{tsv.name} or {layout.folder}/hf_parquet/{split}/> "
        f"or set {GLUE_DIR_ENV}"
    )
