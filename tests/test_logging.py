"""Loggers: JSONL truncation on resume, and wandb in offline mode (no network)."""

from __future__ import annotations

import json
import time

import pytest

from lora_jax.logging import JsonlLogger, Loggers, WandbLogger, read_jsonl


def test_jsonl_logger_drops_records_past_the_resume_step(tmp_path):
    logger = JsonlLogger(tmp_path)
    for step in (10, 20, 30):
        logger.log({"step": step, "loss": step / 10}, "train")
    logger.log({"step": 20, "epoch": 0, "accuracy": 0.5}, "metrics")
    resumed = JsonlLogger(tmp_path, resume_step=20)
    resumed.log({"step": 30, "loss": 9.0}, "train")
    assert [r["step"] for r in read_jsonl(tmp_path / "train.jsonl")] == [10, 20, 30]
    assert read_jsonl(tmp_path / "train.jsonl")[-1]["loss"] == 9.0
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1


@pytest.mark.slow  # wandb's service process writes the log
def test_wandb_offline_logs_without_a_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_logger = WandbLogger(
        tmp_path, {"task": "mrpc", "lora": {"r": 8}}, project="lora_jax_test", group="glue/mrpc", name="run0",
        mode="offline",
    )  # fmt: skip
    logger = Loggers(JsonlLogger(tmp_path), wandb_logger)
    logger.log({"step": 1, "loss": 0.7}, "train")
    logger.log({"step": 1, "epoch": 0, "accuracy": 0.6}, "metrics")
    logger.log({"step": 1, "epoch": 0, "samples": [{"mr": "name : Aromi", "output": "Aromi ."}]}, "samples")
    assert wandb_logger.run.config["task"] == "mrpc" and wandb_logger.run.group == "glue/mrpc"
    logger.finish({"best": 0.6, "history": []})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    wanted = (b"metrics/accuracy", b"train/loss", b"mrpc", b"samples/samples")
    # The transaction log (what `wandb sync` uploads later) is written by wandb's service process, which can
    # still be flushing it when finish() returns on a loaded machine: wait for it, up to a deadline.
    deadline, records = time.monotonic() + 60, b""
    while time.monotonic() < deadline:
        records = next(runs[0].glob("*.wandb")).read_bytes()
        if all(w in records for w in wanted):
            break
        time.sleep(0.2)
    assert all(w in records for w in wanted), records[:200]
    assert json.loads((tmp_path / "train.jsonl").read_text())["loss"] == 0.7
