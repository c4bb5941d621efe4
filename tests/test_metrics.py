"""GLUE metrics: the paper's metric per task, equal to sklearn/scipy on random inputs, known edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from lora_jax.data.glue import TASKS
from lora_jax.data.metrics import glue_metrics, main_metric, predictions_from_logits


def test_metric_names_per_task() -> None:
    names = {task: sorted(glue_metrics(task, *_labels(task, 20, seed=0)).keys()) for task in TASKS}
    assert names == {
        "cola": ["mcc"],
        "sst2": ["accuracy"],
        "mrpc": ["accuracy", "f1"],
        "qqp": ["accuracy", "f1"],
        "stsb": ["pearson", "spearman"],
        "mnli": ["accuracy"],
        "qnli": ["accuracy"],
        "rte": ["accuracy"],
        "wnli": ["accuracy"],
    }
    main = {task: main_metric(task) for task in TASKS}
    assert main == {**dict.fromkeys(TASKS, "accuracy"), "cola": "mcc", "stsb": "pearson"}


def _labels(task: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if TASKS[task].is_regression:
        gold = rng.uniform(0, 5, n).astype(np.float32)
        return (gold + rng.normal(0, 1.5, n)).astype(np.float32), gold
    k = TASKS[task].num_labels
    return rng.integers(0, k, n), rng.integers(0, k, n)


@pytest.mark.parametrize("seed", range(5))
def test_random_inputs_match_sklearn_scipy(seed: int) -> None:
    pred, gold = _labels("mrpc", 101, seed)
    got = glue_metrics("mrpc", pred, gold)
    assert got["accuracy"] == pytest.approx(np.mean(pred == gold))
    assert got["f1"] == pytest.approx(skm.f1_score(gold, pred, pos_label=1, average="binary"))
    pred, gold = _labels("cola", 101, seed)
    assert glue_metrics("cola", pred, gold)["mcc"] == pytest.approx(skm.matthews_corrcoef(gold, pred))
    pred, gold = _labels("mnli", 101, seed)
    assert glue_metrics("mnli", pred, gold)["accuracy"] == pytest.approx(np.mean(pred == gold))
    pred, gold = _labels("stsb", 101, seed)
    got = glue_metrics("stsb", pred, gold)
    assert got["pearson"] == pytest.approx(stats.pearsonr(gold, pred).statistic, rel=1e-6)
    assert got["spearman"] == pytest.approx(stats.spearmanr(gold, pred).statistic, rel=1e-6)
    assert all(isinstance(v, float) for v in got.values())


def test_f1_is_of_the_positive_class() -> None:
    # class 1: TP=1 FP=0 FN=2 -> P=1, R=1/3, F1=1/2. (Class 0 would give P=1/2, R=1, F1=2/3.)
    gold, pred = np.array([1, 1, 1, 0, 0]), np.array([1, 0, 0, 0, 0])
    assert glue_metrics("qqp", pred, gold) == {"accuracy": pytest.approx(0.6), "f1": pytest.approx(0.5)}


def test_edge_cases() -> None:
    gold = np.array([0, 1, 1, 0, 1])
    assert glue_metrics("cola", gold, gold)["mcc"] == pytest.approx(1.0)
    assert glue_metrics("cola", 1 - gold, gold)["mcc"] == pytest.approx(-1.0)
    assert (
        glue_metrics("cola", np.ones_like(gold), gold)["mcc"] == 0.0
    )  # constant predictions: no correlation
    assert glue_metrics("mrpc", gold, gold) == {"accuracy": 1.0, "f1": 1.0}
    scores = np.array([0.0, 1.0, 2.0, 3.0, 4.5], np.float32)
    assert glue_metrics("stsb", 2 * scores + 1, scores)["pearson"] == pytest.approx(1.0)
    monotone = glue_metrics("stsb", np.exp(scores), scores)  # same ranks, not linear
    assert monotone["spearman"] == pytest.approx(1.0) and monotone["pearson"] < 0.99
    with pytest.warns(stats.ConstantInputWarning):
        assert np.isnan(glue_metrics("stsb", np.full(5, 2.5), scores)["pearson"])


def test_weights_drop_padding_rows() -> None:
    pred, gold = _labels("rte", 30, seed=3)
    weights = np.r_[np.ones(25), np.zeros(5)]
    assert glue_metrics("rte", pred, gold, weights) == glue_metrics("rte", pred[:25], gold[:25])
    pred, gold = _labels("stsb", 30, seed=3)
    assert glue_metrics("stsb", pred, gold, weights) == glue_metrics("stsb", pred[:25], gold[:25])
    with pytest.raises(ValueError, match="differ in shape"):
        glue_metrics("rte", pred[:3], gold)


def test_predictions_from_logits() -> None:
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]], np.float32)
    pred = predictions_from_logits("mnli", logits)
    assert pred.tolist() == [1, 0, 2] and pred.dtype == np.int32
    score = predictions_from_logits("stsb", np.array([[4.2], [0.5]], np.float32))
    np.testing.assert_array_equal(score, np.array([4.2, 0.5], np.float32))
    assert predictions_from_logits("stsb", np.array([1.5, 2.5])).shape == (2,)
