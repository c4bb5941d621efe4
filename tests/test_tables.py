"""aggregate.py and tables.py on fake run folders: medians over seeds, links, and cells with no run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def fake_run(results: Path, task: str, method: str, seed: int, best: float) -> Path:
    run = f"lora_r8_a8_seed{seed}" if method == "lora" else f"{method}_seed{seed}"
    folder = results / "glue_minilm" / task / run
    folder.mkdir(parents=True)
    summary = {
        "exp": "glue_minilm", "task": task, "run": run, "seed": seed, "method": method, "best": best,
        "main_metric": "accuracy", "trainable_params": 222_338 if method == "lora" else 22_713_986,
        "history": [{"epoch": e} for e in range(3)], "lora": {"r": 8, "alpha": 8} if method == "lora" else None,
    }  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": 1e-3 if method == "lora" else 5e-5}}))
    return folder


def test_aggregate_reports_the_median_over_seeds(tmp_path):
    for seed, best in enumerate([0.80, 0.70, 0.90]):
        fake_run(tmp_path, "mrpc", "lora", seed, best)
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "aggregate.py"), "exp=glue_minilm", f"results_dir={tmp_path}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    line = next(row for row in out.splitlines() if row.startswith("mrpc"))
    assert "lora_r8_a8" in line and " 0.8000 " in line and " 3 " in line


def test_glue_minilm_table_has_medians_links_gaps_and_missing_cells(tmp_path):
    for seed, (lora, full) in enumerate([(0.80, 0.82), (0.70, 0.84), (0.90, 0.83)]):
        fake_run(tmp_path, "mrpc", "lora", seed, lora)
        fake_run(tmp_path, "mrpc", "full", seed, full)
    fake_run(tmp_path, "rte", "lora", 0, 0.6)
    out = tmp_path / "tables"
    subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "tables.py"), f"results_dir={tmp_path}", f"out={out}"], check=True
    )
    text = (out / "glue_minilm.md").read_text()
    lora_row = next(row for row in text.splitlines() if row.startswith("| LoRA r=8"))
    full_row = next(row for row in text.splitlines() if row.startswith("| FT"))
    assert "80.0 <sub>n=3" in lora_row and "60.0 <sub>n=1" in lora_row
    assert "83.0 <sub>n=3" in full_row and "no run" in full_row  # no full-FT run on RTE
    assert "../glue_minilm/mrpc/lora_r8_a8_seed0" in lora_row
    assert "MRPC -3.0" in text
    assert "paper: roberta_base LoRA" in text and "89.7" in text  # the paper's number from paper_numbers.yaml
