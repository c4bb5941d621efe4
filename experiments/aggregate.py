"""Median over seeds of every group of runs (the paper reports the median of 5 seeds).

    python experiments/aggregate.py exp=glue_minilm [results_dir=results]

A group is the runs of one task whose folder names differ only in `_seed<k>`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf


@dataclasses.dataclass(frozen=True)
class Group:
    exp: str
    task: str
    name: str  # the run name without its seed, e.g. lora_r8_a8 or full
    runs: tuple[dict[str, Any], ...]

    @property
    def scores(self) -> list[float]:
        return [r["best"] for r in self.runs]

    @property
    def median(self) -> float:
        return statistics.median(self.scores)

    @property
    def folders(self) -> list[str]:
        return [r["folder"] for r in self.runs]


def load_summaries(results_dir: str | Path, exp: str) -> list[dict[str, Any]]:
    summaries = []
    for path in sorted(Path(results_dir, exp).glob("*/*/summary.json")):
        summary = json.loads(path.read_text())
        if summary.get("best") is not None:
            summaries.append({**summary, "folder": str(path.parent)})
    return summaries


def group_runs(summaries: list[dict[str, Any]]) -> list[Group]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for s in summaries:
        name = re.sub(r"_seed\d+$", "", s["run"])
        groups.setdefault((s["exp"], s["task"], name), []).append(s)
    return [Group(*key, tuple(sorted(runs, key=lambda r: r["seed"]))) for key, runs in sorted(groups.items())]


@hydra.main(config_path="../conf/scripts", config_name="aggregate", version_base=None)
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "exp"):
        sys.exit("usage: python experiments/aggregate.py exp=<name> [results_dir=results]")
    groups = group_runs(load_summaries(cfg.results_dir, cfg.exp))
    if not groups:
        sys.exit(f"error: no finished runs under {cfg.results_dir}/{cfg.exp}")
    print(f"{'task':6} {'runs':14} {'metric':9} {'median':>7}  {'n':>2}  seeds")
    for g in groups:
        seeds = " ".join(f"{s:.4f}" for s in g.scores)
        print(
            f"{g.task:6} {g.name:14} {g.runs[0]['main_metric']:9} {g.median:7.4f}  {len(g.runs):2d}  {seeds}"
        )


if __name__ == "__main__":
    main()
