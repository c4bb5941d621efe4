"""Text classification beyond GLUE: rotten_tomatoes from the hub, and any text/label columns from your own files.

Every task here is a `GlueTask` and every split a `GlueSplit`, so `tokenize`, the metrics and the trainer take
them unchanged. Two kinds:

  registered  `TEXT_TASKS`, e.g. rotten_tomatoes (Pang & Lee 2005; 8,530 / 1,066 / 1,066 movie-review
              sentences, neg/pos, accuracy), read from the hub (datasets.load_dataset) or from local
              files <dir>/<task>/<split>.{csv,tsv,jsonl,parquet}
  "file"      your own files, one per split: `file_task(...)` names the text and label columns, and infers
              the label names from the train file unless given

Local files: CSV with standard quoting; TSV without quoting, as GLUE's, so a stray `"` in a sentence cannot
silently merge rows; JSONL, one JSON object per line; parquet (pyarrow). The first CSV/TSV row is the header.

Labels: a label equal to one of `label_names` becomes its index; an integer in range is taken as the id itself
(the hub's ClassLabel columns); anything else is an error. A missing label is -1 (NaN for regression): allowed
in test splits only.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax.data import glue
from lora_jax.data.glue import GlueSplit, GlueTask

FILE_TASK = "file"
EXTENSIONS = (".csv", ".tsv", ".jsonl", ".parquet")

TEXT_TASKS: dict[str, GlueTask] = {
    "rotten_tomatoes": GlueTask(
        "rotten_tomatoes", "rotten_tomatoes", ("text",), ("text",), "label", ("neg", "pos"),
        ("accuracy",), "accuracy",
    ),
}  # fmt: skip
HUB_NAMES = {"rotten_tomatoes": "cornell-movie-review-data/rotten_tomatoes"}
# A folder in the hub's parquet layout (<split>/*.parquet) that a registered task reads when no data.dir is given.
DIR_ENVS = {"rotten_tomatoes": "LORA_JAX_ROTTEN_TOMATOES_DIR"}


# ------------------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------------------


def read_table(path: str | os.PathLike) -> dict[str, list[Any]]:
    """{column: values} of a .csv, .tsv, .jsonl or .parquet file. CSV/TSV cells stay strings ('' if empty)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No such data file: {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, suffix)
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        names = list(dict.fromkeys(k for r in records for k in r))
        return {n: [r.get(n) for r in records] for n in names}
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return {n: [None if _missing(v) else v for v in col] for n, col in pq.read_table(path).to_pydict().items()}
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(EXTENSIONS)}")


def _read_delimited(path: Path, suffix: str) -> dict[str, list[str]]:
    tsv = suffix == ".tsv"
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig drops a byte-order mark
        reader = csv.reader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        rows = [r for r in reader if r]
    if not rows:
        raise ValueError(f"{path} is empty; is it the right file?")
    header, rows = rows[0], rows[1:]
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}: line {line} has {len(row)} fields, the header {len(header)}; is it intact?")
    return {name: [row[i] for row in rows] for i, name in enumerate(header)}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _columns(table: Mapping[str, list[Any]], names: Sequence[str], where: str) -> list[list[Any]]:
    absent = [n for n in names if n not in table]
    if absent:
        raise ValueError(
            f"{where} has no column {', '.join(map(repr, absent))}; available columns: {', '.join(table)}. "
            "Set data.text_columns / data.label_column."
        )
    return [list(table[n]) for n in names]


def _texts(values: list[Any], column: str, where: str) -> list[str]:
    for row, v in enumerate(values):
        if v is None:
            raise ValueError(f"{where}: data row {row + 1} has no text in column {column!r}; fill or drop it")
    return [str(v) for v in values]


# ------------------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------------------


def _as_int(value: Any) -> int | None:
    """The integer a label cell holds (1, 1.0, "1"), or None if it is not one."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def label_ids(spec: GlueTask, raw: Sequence[Any], where: str) -> np.ndarray:
    """Label cells -> int32 class ids (float32 scores for regression); missing -> -1 (NaN)."""
    if spec.is_regression:
        try:
            return np.array([np.nan if v is None or v == "" else float(v) for v in raw], np.float32)
        except ValueError as e:
            raise ValueError(f"{where}: regression labels must be numbers ({e})") from None
    ids = []
    for row, v in enumerate(raw):
        if v is None or v == "":
            ids.append(-1)
        elif str(v) in spec.label_names:
            ids.append(spec.label_names.index(str(v)))
        elif (i := _as_int(v)) is not None and 0 <= i < spec.num_labels:
            ids.append(i)
        else:
            raise ValueError(
                f"{where}: data row {row + 1} has label {v!r}, not one of {list(spec.label_names)} "
                f"nor an id 0..{spec.num_labels - 1}; set data.label_names"
            )
    return np.array(ids, np.int32)


def infer_label_names(raw: Sequence[Any]) -> tuple[str, ...]:
    """Integer labels 0..k -> ("0", ..., "k"); other labels -> their sorted distinct strings."""
    values = [v for v in raw if v is not None and v != ""]
    if not values:
        raise ValueError("The train file has no labels to infer label names from; set data.label_names")
    ints = [_as_int(v) for v in values]
    if all(i is not None for i in ints):
        if min(ints) < 0:
            raise ValueError(f"Integer labels must be class ids >= 0, found {min(ints)}; set data.label_names")
        return tuple(str(i) for i in range(max(ints) + 1))
    return tuple(sorted({str(v) for v in values}))


# ------------------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------------------


def file_task(
    train_file: str | os.PathLike,
    text_columns: Sequence[str] = ("text",),
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    regression: bool = False,
    has_test: bool = False,
    name: str = FILE_TASK,
) -> GlueTask:
    """A task over your own files: one or two text columns, one label column.

    label_names None: inferred from the train file. regression: one float output scored by Pearson/Spearman.
    """
    text_columns = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
    if not 1 <= len(text_columns) <= 2:
        raise ValueError(f"text_columns must name one or two columns (a text or a pair), got {list(text_columns)}")
    if regression:
        names: tuple[str, ...] = ()
    elif label_names is not None:
        names = tuple(str(n) for n in label_names)
        if len(names) < 2:
            raise ValueError(f"label_names needs at least two classes, got {list(names)}; or set regression=true")
    else:
        (raw,) = _columns(read_table(train_file), [label_column], str(train_file))
        names = infer_label_names(raw)
        if len(names) < 2:
            raise ValueError(f"{train_file}: only one label ({names[0]!r}) in column {label_column!r}")
    metrics, main = (("pearson", "spearman"), "pearson") if regression else (("accuracy",), "accuracy")
    return GlueTask(
        name, name, text_columns, text_columns, label_column, names, metrics, main,
        test_splits=("test",) if has_test else (),
    )  # fmt: skip


def get_text_task(task: str) -> GlueTask:
    if task not in TEXT_TASKS:
        raise ValueError(f"Text task {task!r} unknown; choose one of {', '.join(TEXT_TASKS)}, or task={FILE_TASK}")
    return TEXT_TASKS[task]


# ------------------------------------------------------------------------------------------------------------
# Loading rows
# ------------------------------------------------------------------------------------------------------------


def _local_file(folder: Path, split: str) -> Path | None:
    for ext in EXTENSIONS:
        if (folder / f"{split}{ext}").is_file():
            return folder / f"{split}{ext}"
    return None


def _read_hub(spec: GlueTask, split: str) -> dict[str, list[Any]]:
    import datasets

    name = HUB_NAMES[spec.name]
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, or a hub error: say what to do instead
        raise ConnectionError(
            f"Could not load {name} from the Hugging Face hub ({type(e).__name__}); offline? "
            f"Pass data.dir=<folder with {spec.folder}/{split}.parquet (or .csv, .tsv, .jsonl)>"
        ) from e
    return {c: ds[c] for c in ds.column_names}


def load_text(
    task: str | GlueTask,
    split: str,
    data_dir: str | os.PathLike | None = None,
    file: str | os.PathLike | None = None,
    source: str = "auto",
) -> GlueSplit:
    """Rows of one split of a text task.

    file: read this file (the only source for a "file" task). Otherwise source "auto" reads
    <data_dir>/<task>/<split>.<ext> when that folder exists and the hub if not; "local" or "hub" force one.
    """
    spec = get_text_task(task) if isinstance(task, str) else task
    if split not in spec.splits:
        raise ValueError(f"Task {spec.name!r} has no split {split!r}; choose one of {', '.join(spec.splits)}")
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"Text data source {source!r} unknown; choose one of auto, local, hub")
    folder = Path(data_dir).expanduser() / spec.folder if data_dir else None
    if file is None and source != "hub" and folder is not None and (folder.is_dir() or source == "local"):
        file = _local_file(folder, split)
        if file is None:
            raise FileNotFoundError(f"No {split}{{{','.join(EXTENSIONS)}}} in {folder}; is data.dir right?")
    env_dir = os.environ.get(DIR_ENVS.get(spec.name, ""), "")
    if file is None and source != "hub" and env_dir:
        parquet = sorted((Path(env_dir) / split).glob("*.parquet"))
        if not parquet:
            raise FileNotFoundError(f"No {split}/*.parquet in {env_dir}; is {DIR_ENVS[spec.name]} right?")
        file = parquet[0]
    if file is not None:
        table, where = read_table(file), str(file)
    elif spec.name in HUB_NAMES and source != "local":
        table, where = _read_hub(spec, split), f"{HUB_NAMES[spec.name]} {split}"
    else:
        raise FileNotFoundError(f"No file for {spec.name} split {split!r}; pass data.{split}_file=<path>")
    *texts, raw = _columns(table, [*spec.text_columns, spec.tsv_label_column], where)
    texts = [_texts(t, c, where) for t, c in zip(texts, spec.text_columns, strict=True)]
    labels = label_ids(spec, raw, where)
    unlabelled = np.isnan(labels) if spec.is_regression else labels == -1
    if split not in spec.test_splits and unlabelled.any():
        raise ValueError(f"{where}: {unlabelled.sum()} rows have no label; fill them or use the file as test split")
    return GlueSplit(spec.name, split, texts[0], texts[1] if spec.is_pair else None, labels)


# ------------------------------------------------------------------------------------------------------------
# One entry point for GLUE and text tasks, driven by the run's `data` config
# ------------------------------------------------------------------------------------------------------------


def task_from_config(task: str, data: Mapping[str, Any]) -> GlueTask:
    """The task named `task`: a GLUE task, a registered text task, or "file" (columns from `data`).

    `data` keys used for "file": train_file, test_file, text_columns, label_column, label_names, regression.
    """
    if task in glue.TASKS:
        return glue.get_task(task)
    if task in TEXT_TASKS:
        return TEXT_TASKS[task]
    if task != FILE_TASK:
        choices = ", ".join([*glue.TASKS, *TEXT_TASKS, FILE_TASK])
        raise ValueError(f"Task {task!r} unknown; choose one of {choices}")
    if not data.get("train_file") or not data.get("validation_file"):
        raise ValueError(
            "task=file needs data.train_file=<path> and data.validation_file=<path> (use data=text for the keys)"
        )
    return file_task(
        data["train_file"],
        text_columns=data.get("text_columns") or ("text",),
        label_column=data.get("label_column") or "label",
        label_names=data.get("label_names"),
        regression=bool(data.get("regression")),
        has_test=bool(data.get("test_file")),
    )


def load_split(spec: GlueTask, split: str, data: Mapping[str, Any]) -> GlueSplit:
    """Rows of `split` from wherever `data` says: GLUE's folders/hub, a text task's, or data.<split>_file."""
    if glue.TASKS.get(spec.name) is spec:
        return glue.load_glue(spec.name, split, data.get("dir"), data.get("source") or "auto")
    return load_text(spec, split, data.get("dir"), data.get(f"{split}_file"), data.get("source") or "auto")
