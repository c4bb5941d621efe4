"""GLUE metrics as the LoRA paper reports them, computed by sklearn/scipy (the calls HF `evaluate` makes).

Values are fractions (0.912), not percentages. MRPC/QQP F1 is binary F1 of class 1 (equivalent / duplicate).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from lora_jax.data.glue import get_task
from lora_jax.data.tasks import ClassificationTask

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda pred, gold: skm.accuracy_score(gold, pred),
    # F1 of class 1; labels=[1] keeps it defined when a prediction is -1 (a generated answer naming no class).
    "f1": lambda pred, gold: skm.f1_score(gold, pred, labels=[1], average="macro"),
    "mcc": lambda pred, gold: skm.matthews_corrcoef(gold, pred),
    "pearson": lambda pred, gold: stats.pearsonr(pred, gold)[0],  # nan if either side is constant
    "spearman": lambda pred, gold: stats.spearmanr(pred, gold)[0],
}


def main_metric(task: str | ClassificationTask) -> str:
    """The number Table 2 of the paper shows: MCC for CoLA, Pearson for STS-B, accuracy otherwise."""
    return get_task(task).main_metric


def predictions_from_logits(task: str | ClassificationTask, logits: np.ndarray) -> np.ndarray:
    """Class ids (argmax), or the raw score for regression (logits of shape (n,) or (n, 1))."""
    logits = np.asarray(logits)
    if get_task(task).is_regression:
        return logits.reshape(len(logits)).astype(np.float32)
    return logits.argmax(axis=-1).astype(np.int32)


def glue_metrics(
    task: str | ClassificationTask, predictions: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, float]:
    """The task's metrics over rows with weight > 0 (padding rows from batching carry weight 0)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
    if weights is not None:
        keep = np.asarray(weights) > 0
        predictions, labels = predictions[keep], labels[keep]
    return {name: float(METRICS[name](predictions, labels)) for name in get_task(task).metrics}
