"""experiments/lr_selection.py on fake run folders: the best epoch per grid point, the selected lr per method,
the under-training flag, and runs still training never selected."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from lr_selection import lr_selection_table, read_grid, selected  # noqa: E402


def fake_point(results: Path, task: str, method: str, lr: float, scores: list[float], finished: bool = True):
    folder = results / "glue_minilm_lrsel" / task / f"{method}_seed0_lr{lr:g}"
    folder.mkdir(parents=True)
    cfg = {"task": task, "method": method, "optim": {"lr": lr, "epochs": 4}}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    metric = "pearson" if task == "stsb" else "accuracy"
    rows = [{"epoch": e, metric: s} for e, s in enumerate(scores)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (folder / "summary.json").write_text(json.dumps({"main_metric": metric, "best": max(scores)}))


def test_selection_picks_the_best_finished_point_and_flags_a_last_epoch_best(tmp_path):
    fake_point(tmp_path, "mrpc", "lora", 5e-4, [0.70, 0.75, 0.76, 0.77])  # best at the last epoch
    fake_point(tmp_path, "mrpc", "lora", 1e-3, [0.72, 0.80, 0.79, 0.78])
    fake_point(tmp_path, "mrpc", "lora", 2e-3, [0.81, 0.90], finished=False)  # better, but still training
    fake_point(tmp_path, "stsb", "full", 2e-5, [0.85, 0.87, 0.86, 0.86])

    points = read_grid(tmp_path)
    chosen = selected(points)
    assert chosen[("mrpc", "lora")].lr == 1e-3 and chosen[("mrpc", "lora")].best_epoch == 1
    assert chosen[("stsb", "full")].best == 0.87

    table = lr_selection_table(tmp_path, tmp_path / "tables")
    rows = [line for line in table.splitlines() if line.startswith("| MRPC")]
    assert "77.0 | 4 ⚠ / 4 | finished" in rows[0]
    assert "**80.0** | 2 / 4 | finished" in rows[1]
    assert "90.0 | 2 / 2 | training (2/4 epochs)" in rows[2] and "**" not in rows[2]
    assert ("MRPC LoRA r=8 α=8 W_q,W_v lr 0.001 (80.0), provisional: 1 still training; "
            "STS-B full FT lr 2e-05 (87.0).") in table
