"""Datasets, tokenising, batching and metrics. Knows nothing about models beyond a tokenizer."""

from lora_jax.data.batching import default_buckets, epoch_batches, eval_batches, num_batches
from lora_jax.data.glue import GLUE_DIR_ENV, TASKS, get_task, load_glue
from lora_jax.data.metrics import glue_metrics, main_metric, predictions_from_logits
from lora_jax.data.tasks import ClassificationTask, TextSplit, read_table, tokenize
from lora_jax.data.text import TEXT_TASKS, file_task, load_split, load_text, task_from_config

__all__ = [
    "GLUE_DIR_ENV",
    "TASKS",
    "TEXT_TASKS",
    "ClassificationTask",
    "TextSplit",
    "default_buckets",
    "epoch_batches",
    "eval_batches",
    "file_task",
    "get_task",
    "glue_metrics",
    "load_glue",
    "load_split",
    "load_text",
    "main_metric",
    "num_batches",
    "predictions_from_logits",
    "read_table",
    "task_from_config",
    "tokenize",
]
