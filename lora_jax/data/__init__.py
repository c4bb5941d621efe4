"""Datasets, tokenising, batching and metrics. Knows nothing about models beyond a tokenizer."""

from lora_jax.data.batching import default_buckets, epoch_batches, eval_batches, num_batches, shard_batch
from lora_jax.data.glue import GLUE_DIR_ENV, TASKS, GlueSplit, GlueTask, get_task, load_glue, tokenize
from lora_jax.data.metrics import glue_metrics, main_metric, predictions_from_logits

__all__ = [
    "GLUE_DIR_ENV",
    "TASKS",
    "GlueSplit",
    "GlueTask",
    "default_buckets",
    "epoch_batches",
    "eval_batches",
    "get_task",
    "glue_metrics",
    "load_glue",
    "main_metric",
    "num_batches",
    "predictions_from_logits",
    "shard_batch",
    "tokenize",
]
