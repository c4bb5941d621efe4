"""What a text classification task is, and the one path every dataset takes from a table to token arrays.

GLUE (lora_jax.data.glue), the registered text tasks and your own files (lora_jax.data.text) differ only in where
their tables come from. Once a table is read, the same code picks its columns, parses its labels and tokenises:

  read_table       .csv / .tsv / .jsonl / .parquet file -> {column: values}
  read_hub         a Hugging Face hub dataset split (datasets.load_dataset) -> {column: values}
  rows_from_table  {column: values} -> TextSplit (texts + label ids), with one rule for labels
  tokenize         TextSplit -> int32 token arrays, padded by the tokenizer itself

Labels: a label equal to one of `label_names` becomes its index; an integer in range is taken as the id itself
(the hub's ClassLabel columns, GLUE's 0/1 TSV columns); anything else is an error. A missing label is -1 for
classes and NaN for regression (where -1 can be a real score); only test splits may have them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

EXTENSIONS = (".csv", ".tsv", ".jsonl", ".parquet")
Table = dict[str, list[Any]]


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
    """Sentence (or sentence-pair) classification, or regression when it has no label names.

    text_columns: the one or two text columns; label_column: the label's column (both as the hub names them).
    label_names: class names in label-id order; empty for regression (one float output, as HF's STS-B).
    metrics: what `metrics.glue_metrics` reports; main_metric: the one that picks the best epoch.
    """

    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    metrics: tuple[str, ...] = ("accuracy",)
    main_metric: str = "accuracy"
    label_column: str = "label"
    dev_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)

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

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"Task {self.name!r} has no split {split!r}; choose one of {', '.join(self.splits)}")


@dataclasses.dataclass(frozen=True)
class TextSplit:
    """The rows of one split: texts, and labels (int32 class ids, -1 unknown; float32 scores, NaN unknown)."""

    task: str
    split: str
    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.text_a)

    @property
    def unlabelled(self) -> np.ndarray:
        """True where a row has no label (test splits)."""
        return np.isnan(self.labels) if self.labels.dtype.kind == "f" else self.labels == -1


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------


def read_table(path: str | os.PathLike, names: Sequence[str] | None = None) -> Table:
    """{column: values} of a .csv, .tsv, .jsonl or .parquet file. CSV/TSV cells stay strings ('' if empty).

    CSV uses standard quoting; TSV none at all (as GLUE's), so a stray `"` in a sentence cannot merge rows.
    The first CSV/TSV row is the header, unless `names` names the columns of a file without one.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No such data file: {path}")
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(EXTENSIONS)}")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = {n: [None if _null(v) else v for v in col] for n, col in pq.read_table(path).to_pydict().items()}
        elif suffix == ".jsonl":
            table = _read_jsonl(path)
        else:
            table = _read_delimited(path, suffix, names)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (it holds byte 0x{e.object[e.start]:02x}); re-save it as UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8 {path.name} > utf8_{path.name}"
        ) from None
    if not any(table.values()):
        raise ValueError(f"{path} has no data rows; add rows, or point the config at the right file")
    return table


def read_tables(paths: Sequence[str | os.PathLike]) -> Table:
    """The tables of several files of one split (e.g. parquet shards 0000, 0001, ...), one after the other."""
    tables = [read_table(p) for p in paths]
    return {k: [v for t in tables for v in t[k]] for k in tables[0]}


def _read_delimited(path: Path, suffix: str, names: Sequence[str] | None) -> Table:
    tsv = suffix == ".tsv"
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig drops a byte-order mark (MRPC has one)
        reader = csv.reader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        rows = [(reader.line_num, r) for r in reader if r]
    if not rows:
        raise ValueError(f"{path} is empty; add a header and rows, or point the config at the right file")
    if names is None:
        (_, header), rows = rows[0], rows[1:]
        width = f"the header {len(header)}"
    else:
        header, width = list(names), f"needs {len(names)}"
    for line, row in rows:
        if len(row) != len(header):
            raise ValueError(f"{path}: line {line} has {len(row)} fields, {width}; is it intact?")
    return {name: [row[i] for _, row in rows] for i, name in enumerate(header)}


def _read_jsonl(path: Path) -> Table:
    records = []
    with open(path, encoding="utf-8") as f:
        for line_num, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {line_num} is not JSON ({e.msg}); one object per line") from None
    names = list(dict.fromkeys(k for r in records for k in r))
    return {n: [r.get(n) for r in records] for n in names}


def read_hub(name: str, config: str | None, split: str, fix: str) -> Table:
    """{column: values} of a hub dataset split; offline or a hub error: a ConnectionError saying `fix`."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split) if config else datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, or a hub error: say what to do instead
        label = f"{name}/{config}" if config else name
        raise ConnectionError(
            f"Could not load {label} from the Hugging Face hub ({type(e).__name__}); offline? {fix}"
        ) from e
    return ds.to_dict()


def _null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _missing(value: Any) -> bool:
    """A label cell that holds no label: null, NaN or an empty CSV/TSV cell."""
    return _null(value) or (isinstance(value, str) and value == "")


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


def label_ids(task: ClassificationTask, raw: Sequence[Any], where: str) -> np.ndarray:
    """Label cells -> int32 class ids (float32 scores for regression); missing -> -1 (NaN)."""
    if task.is_regression:
        try:
            return np.array([np.nan if _missing(v) else float(v) for v in raw], np.float32)
        except ValueError as e:
            raise ValueError(f"{where}: regression labels must be numbers ({e})") from None
    ids = []
    for row, v in enumerate(raw):
        if _missing(v):
            ids.append(-1)
        elif str(v) in task.label_names:
            ids.append(task.label_names.index(str(v)))
        elif (i := _as_int(v)) is not None and 0 <= i < task.num_labels:
            ids.append(i)
        else:
            raise ValueError(
                f"{where}: data row {row + 1} has label {v!r}, not one of {list(task.label_names)} "
                f"nor an id 0..{task.num_labels - 1}; set data.label_names"
            )
    return np.array(ids, np.int32)


def infer_label_names(raw: Sequence[Any], where: str) -> tuple[str, ...]:
    """Integer labels 0..k -> ("0", ..., "k"); other labels -> their sorted distinct strings."""
    values = [v for v in raw if not _missing(v)]
    if not values:
        raise ValueError(f"{where}: the label column is blank in every row; fill it in or set data.label_names")
    ints = [_as_int(v) for v in values]
    if all(i is not None for i in ints):
        if min(ints) < 0:
            raise ValueError(f"{where}: integer labels must be class ids >= 0, found {min(ints)}; set data.label_names")
        return tuple(str(i) for i in range(max(ints) + 1))
    return tuple(sorted({str(v) for v in values}))


# ------------------------------------------------------------------------------------------------------------
# Table -> rows -> token arrays
# ------------------------------------------------------------------------------------------------------------


def columns(table: Mapping[str, list[Any]], names: Sequence[str], where: str) -> list[list[Any]]:
    absent = [n for n in names if n not in table]
    if absent:
        raise ValueError(
            f"{where} has no column {', '.join(map(repr, absent))}; available columns: {', '.join(table)}. "
            "Set data.text_columns / data.label_column."
        )
    return [list(table[n]) for n in names]


def rows_from_table(
    task: ClassificationTask,
    split: str,
    table: Mapping[str, list[Any]],
    where: str,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
) -> TextSplit:
    """A split's texts and label ids from its table (columns named as the task names them, unless given).

    A test split may lack the label column (its rows are then all unlabelled); any other split needs every label.
    """
    text_columns = tuple(text_columns or task.text_columns)
    label_column = label_column or task.label_column
    texts = columns(table, text_columns, where)
    for values, column in zip(texts, text_columns, strict=True):
        for row, v in enumerate(values):
            if v is None:
                raise ValueError(f"{where}: data row {row + 1} has no text in column {column!r}; fill or drop it")
    if label_column in table or split not in task.test_splits:
        (raw,) = columns(table, [label_column], where)
    else:
        raw = [None] * len(texts[0])
    rows = TextSplit(
        task.name, split, [str(v) for v in texts[0]], [str(v) for v in texts[1]] if task.is_pair else None,
        label_ids(task, raw, where),
    )  # fmt: skip
    if split not in task.test_splits and rows.unlabelled.any():
        raise ValueError(
            f"{task.name} {split} ({where}): {rows.unlabelled.sum()} rows have no label; fill them in, "
            "or read the file as a test split"
        )
    return rows


def tokenize(rows: TextSplit, tokenizer: Any, max_len: int) -> dict[str, np.ndarray]:
    """Token arrays of a split, right-padded by the tokenizer to exactly max_len so every split shares one width.

    Returns int32 input_ids, attention_mask, token_type_ids (when the tokenizer makes them) of shape
    (n, max_len), and labels. Batching later crops each batch to a short bucket length.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no pad token; set tokenizer.pad_token = tokenizer.eos_token first"
        )
    enc = tokenizer(
        rows.text_a, rows.text_b, truncation=True, max_length=max_len, padding="max_length", return_tensors="np"
    )
    out = {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    out["labels"] = rows.labels.copy()
    return out
