"""Text classification beyond GLUE: rotten_tomatoes, and any text/label columns from your own files.

Every task here is a `ClassificationTask` and every split a `TextSplit`, read and tokenised by lora_jax.data.tasks
as GLUE's are, so the metrics and the trainer take them unchanged. Two kinds:

  registered  `TEXT_TASKS`, e.g. rotten_tomatoes (Pang & Lee 2005; 8,530 / 1,066 / 1,066 movie-review
              sentences, neg/pos, accuracy), read from local files <dir>/<task>/<split>.{csv,tsv,jsonl,parquet},
              else from the folder its environment variable names (the hub's parquet layout,
              <split>/*.parquet: $LORA_JAX_ROTTEN_TOMATOES_DIR), else from the hub (datasets.load_dataset)
  "file"      your own files, one per split: `file_task(...)` names the text and label columns, and infers
              the label names from the train file unless given
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_jax.data import glue
from lora_jax.data.tasks import (
    EXTENSIONS,
    ClassificationTask,
    TextSplit,
    columns,
    infer_label_names,
    read_hub,
    read_table,
    read_tables,
    rows_from_table,
)

FILE_TASK = "file"


@dataclasses.dataclass(frozen=True)
class TextTaskSource:
    """Where a registered text task's rows live: a hub dataset, and an environment variable naming a local copy."""

    hub_name: str
    dir_env: str


TEXT_TASKS: dict[str, ClassificationTask] = {
    "rotten_tomatoes": ClassificationTask("rotten_tomatoes", ("text",), ("neg", "pos")),
}
SOURCES: dict[str, TextTaskSource] = {
    "rotten_tomatoes": TextTaskSource("cornell-movie-review-data/rotten_tomatoes", "LORA_JAX_ROTTEN_TOMATOES_DIR"),
}


def file_task(
    train_file: str | os.PathLike,
    text_columns: Sequence[str] = ("text",),
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    regression: bool = False,
    has_test: bool = False,
    name: str = FILE_TASK,
) -> ClassificationTask:
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
        (raw,) = columns(read_table(train_file), [label_column], str(train_file))
        names = infer_label_names(raw, f"{train_file} column {label_column!r}")
        if len(names) < 2:
            raise ValueError(
                f"{train_file}: only one label ({names[0]!r}) in column {label_column!r}; "
                "a classifier needs two, or set data.regression=true"
            )
    metrics, main = (("pearson", "spearman"), "pearson") if regression else (("accuracy",), "accuracy")
    return ClassificationTask(
        name, text_columns, names, metrics, main, label_column, test_splits=("test",) if has_test else ()
    )


def get_text_task(task: str) -> ClassificationTask:
    if task not in TEXT_TASKS:
        raise ValueError(f"Text task {task!r} unknown; choose one of {', '.join(TEXT_TASKS)}, or task={FILE_TASK}")
    return TEXT_TASKS[task]


def _local_files(folder: Path, split: str) -> list[Path]:
    """<folder>/<split>.<ext>, or every <folder>/<split>/*.parquet (the hub's parquet layout)."""
    for ext in EXTENSIONS:
        if (folder / f"{split}{ext}").is_file():
            return [folder / f"{split}{ext}"]
    return sorted((folder / split).glob("*.parquet"))


def _table(spec: ClassificationTask, split: str, folder: Path | None, source: str) -> tuple[dict[str, list[Any]], str]:
    """The table of a registered task's split: data.dir's folder, its environment variable's, or the hub."""
    src = SOURCES.get(spec.name)
    env_dir = os.environ.get(src.dir_env) if src else None
    fix = f"pass data.dir=<folder with {spec.name}/{split}.parquet (or .csv, .tsv, .jsonl)>"
    if src:
        fix += f" or set {src.dir_env}=<folder with {split}/0000.parquet>"
    if source != "hub":
        for where in (folder, Path(env_dir).expanduser() if env_dir else None):
            if where is not None and (where.is_dir() or source == "local"):
                files = _local_files(where, split)
                if not files:
                    raise FileNotFoundError(
                        f"No {split}{{{','.join(EXTENSIONS)}}} nor {split}/*.parquet in {where}; {fix}"
                    )
                return read_tables(files), str(files[0])
    if src is None or source == "local":
        raise FileNotFoundError(f"No file for {spec.name} split {split!r}; pass data.{split}_file=<path>")
    return read_hub(src.hub_name, None, split, fix[0].upper() + fix[1:]), f"{src.hub_name} {split}"


def load_text(
    task: str | ClassificationTask,
    split: str,
    data_dir: str | os.PathLike | None = None,
    file: str | os.PathLike | None = None,
    source: str = "auto",
) -> TextSplit:
    """Rows of one split of a text task.

    file: read this file (the only source for a "file" task). Otherwise source "auto" reads
    <data_dir>/<task>/<split>.<ext> when that folder exists, then the task's environment variable's folder, then
    the hub; "local" or "hub" force one.
    """
    spec = get_text_task(task) if isinstance(task, str) else task
    spec.check_split(split)
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"Text data source {source!r} unknown; choose one of auto, local, hub")
    if file is not None:
        table, where = read_table(file), str(file)
    else:
        table, where = _table(spec, split, Path(data_dir).expanduser() / spec.name if data_dir else None, source)
    return rows_from_table(spec, split, table, where)


def task_from_config(task: str, data: Mapping[str, Any]) -> ClassificationTask:
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


def load_split(spec: ClassificationTask, split: str, data: Mapping[str, Any]) -> TextSplit:
    """Rows of `split` from wherever `data` says: GLUE's folders/hub, a text task's, or data.<split>_file."""
    if glue.TASKS.get(spec.name) is spec:
        return glue.load_glue(spec.name, split, data.get("dir"), data.get("source") or "auto")
    return load_text(spec, split, data.get("dir"), data.get(f"{split}_file"), data.get("source") or "auto")
