"""BLEU's sampling error on our E2E rows: a 95% interval per run and a paired-bootstrap p-value against LoRA's best.

    python experiments/e2e_bootstrap.py [results_dir=results] [data_dir=<e2e folder>]

Our comparable E2E rows are one seed each on the first 100 test MRs, where BLEU moves by several points with the
choice of MRs alone; the paper's Table 3 states intervals for its LoRA rows too. This resamples the MRs (with all
their references) 1,000 times, pairing every run with LoRA's best row on the same draws (sacrebleu's paired
bootstrap), and writes results/<exp>/bleu_bootstrap.json, which experiments/tables.py prints beside the rows. It
reads only the runs' test_outputs.txt and the test references; rerun it when a comparable run lands (the table
marks rows the file does not cover).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from nlg_tables import BOOTSTRAP_FILE, same_footing
from nlg_tables import our_runs as table_runs
from omegaconf import DictConfig

from lora_jax.data import e2e
from lora_jax.data.nlg_metrics import bleu_paired_bootstrap, read_lines


def bootstrap(results_dir: Path, references: Sequence[Sequence[str]], n_samples: int) -> dict[str, Any] | None:
    """The comparable rows' BLEU intervals, and the p-value of every row against each LoRA row (the pairs the
    table's verdict states: LoRA's best, and its smallest against the methods that train as many or more)."""
    runs, key = same_footing(table_runs(results_dir, results_dir, ["BLEU"]))
    loras = [r for r in runs if r["method"] == "lora"]
    if not key or not loras:
        return None
    outputs = {r["run"]: read_lines(r["outputs"]) for r in runs}
    refs = references[: key[1]]
    scores, p_values = {}, {}
    for lora in loras:
        systems = [(lora["run"], outputs[lora["run"]])]
        systems += [(name, lines) for name, lines in outputs.items() if name != lora["run"]]
        result = bleu_paired_bootstrap(systems, refs, n_samples)
        p_values[lora["run"]] = {name: r["p_value"] for name, r in result.items() if name != lora["run"]}
        for name, r in result.items():
            scores.setdefault(name, r)
    runs_out = {name: {"bleu": s["bleu"], "ci95": s["ci95"]} for name, s in scores.items()}
    return {"exp": runs[0]["exp"], "mrs": key[1], "n_samples": n_samples, "runs": runs_out, "p_values": p_values}


@hydra.main(config_path="../conf/scripts", config_name="e2e_bootstrap", version_base=None)
def main(cfg: DictConfig) -> None:
    references = e2e.group_by_mr(e2e.load_e2e("test", cfg.data_dir)).references
    result = bootstrap(Path(cfg.results_dir), references, cfg.n_samples)
    if result is None:
        sys.exit(f"error: no LoRA run among the comparable E2E rows under {cfg.results_dir}; nothing to compare.")
    out = Path(cfg.results_dir) / result["exp"] / BOOTSTRAP_FILE
    out.write_text(json.dumps(result, indent=1) + "\n")
    for run, score in result["runs"].items():
        print(f"{run:55} BLEU {score['bleu']:5.1f} ±{score['ci95']:.1f}")
    for lora, pairs in result["p_values"].items():
        print(f"p against {lora}: " + ", ".join(f"{name} {p:.4f}" for name, p in pairs.items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
