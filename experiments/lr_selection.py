"""The GLUE fidelity protocol, step 1 (issue 19): every learning-rate grid point's dev metric on seed 0, the rate it
selects per task and setting (the paper's rule: best epoch on dev), and which runs are the seeds at that rate.
Step 2, the seeds' table and the verdicts, is tuned_table.py.

A run still training is shown with the epochs it has, so a partial grid reads as partial; it never selects and
never counts as a seed.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from lora_jax.bottleneck import ADAPTER_METHODS
from lora_jax.data import main_metric
from lora_jax.prefix import PREFIX_METHODS

TITLES = {"mrpc": "MRPC", "rte": "RTE", "stsb": "STS-B", "cola": "CoLA", "sst2": "SST-2"}
METHODS = {"lora": "LoRA r=8 α=8 W_q,W_v", "full": "full FT"}
GRID_VARIANT = {"lora": ("lora", 8, 8.0, ("q", "v")), "full": ("full",)}  # what the grid is run with, per method
GRID_LRS = {"full": (2e-5, 5e-5, 1e-4), "lora": (5e-4, 1e-3, 2e-3, 4e-3)}  # results/glue_minilm_lrsel/COMMANDS.md
# Issue 17's baselines: each method's grid (a rate outside it, as BitFit's 8e-3, is an extra grid point). Trained
# input embeddings want larger rates than adapters, so PreEmbed's grid starts higher.
BASELINE_LRS = {"prefix_embed": (2e-3, 4e-3, 8e-3)}
DEFAULT_BASELINE_LRS = (1e-3, 2e-3, 4e-3)
GRID_TASKS = ("mrpc", "rte", "stsb")  # where each method's rate is selected; other tasks borrow (`borrowed_rates`)
EPOCHS = 10  # the protocol's schedule (conf/exp/glue_minilm_lrsel.yaml); a run with other epochs is a row of its own
WITHIN = 1.0  # points: "LoRA matches FT" means its median is at most this far below FT's
TEXT_TOKENS = 128  # every row's text budget (data.max_len; prefix methods add their special tokens to it)
DEV_ROWS = {"mrpc": 408, "rte": 277, "sst2": 872}  # GLUE dev sizes of the accuracy tasks: one row is 100/n points
PLATEAU = 0.25  # points: a last-epoch best this close to an earlier epoch is a plateau (one MRPC dev row: 0.245)


@dataclass(frozen=True)
class GridPoint:
    task: str
    method: str
    lr: float
    scores: tuple[float, ...]  # the main dev metric after each finished epoch
    epochs: int  # epochs the run is configured for
    folder: Path
    finished: bool
    seed: int = 0
    variant: tuple = ()  # (setting,) or ("lora", r, alpha, targets): which row of the tuned table it belongs to
    trainable: int = 0  # trainable parameters (summary.json), 0 while the run is unfinished
    size: str = ""  # a baseline's size ("r=8", "l_p=32 l_i=0"); empty for FT, LoRA (its own grid), BitFit

    @property
    def setting(self) -> str:
        """What a learning rate is selected for: the method, with a baseline's size (two adapter widths on one task
        are two settings, each with its own grid, rate and row)."""
        return f"{self.method} {self.size}" if self.size else self.method

    @property
    def on_grid(self) -> bool:
        """Run at its method's grid setting (LoRA r=8 α=8 on q, v; a baseline's own size, whole text, EPOCHS), not
        a side row such as a cut-text or a longer-schedule run."""
        return self.variant == GRID_VARIANT.get(self.method, (self.setting,))

    @property
    def best_epoch(self) -> int:
        return max(range(len(self.scores)), key=self.scores.__getitem__)

    @property
    def best(self) -> float:
        return self.scores[self.best_epoch]

    @property
    def epoch_mark(self) -> str:
        """⚠ when the best epoch is the last and clearly above every earlier one (still rising: may be
        under-trained), ≈ when it is the last but within PLATEAU of an earlier one, else nothing."""
        if len(self.scores) < 2 or self.best_epoch != len(self.scores) - 1:
            return ""
        return "⚠" if 100 * (self.best - max(self.scores[:-1])) >= PLATEAU else "≈"


def read_grid(results_dir: Path, exp: str = "glue_minilm_lrsel") -> list[GridPoint]:
    """Every run folder of the experiment that has evaluated at least once."""
    points = []
    for config_path in sorted(Path(results_dir, exp).glob("*/*/config.yaml")):
        folder = config_path.parent
        metrics = folder / "metrics.jsonl"
        if not metrics.exists():
            continue
        cfg = yaml.safe_load(config_path.read_text())
        summary_path = folder / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        metric = summary["main_metric"] if summary else main_metric(cfg["task"])
        points.append(GridPoint(
            task=cfg["task"], method=cfg["method"], lr=float(cfg["optim"]["lr"]),
            scores=tuple(r[metric] for r in rows), epochs=int(cfg["optim"]["epochs"]), folder=folder,
            finished=summary is not None, seed=int(cfg.get("seed", 0)), variant=_variant(cfg, folder.name),
            trainable=int(summary.get("trainable_params", 0)) if summary else 0, size=_size(cfg),
        ))  # fmt: skip
    return points


def _variant(cfg: dict, folder_name: str) -> tuple:
    """The row a run belongs to; PEFT+torch reference runs (experiments/peft_reference.py writes peft_<run>) get
    their own "peft" row, so they never select a learning rate or count as lora_jax seeds. A prefix run whose text
    had fewer than TEXT_TOKENS tokens (its special tokens took part of data.max_len: runs from before
    `text_plus_special`) is a row of its own too: it saw less of each example than every other row. So is a run
    trained for other than EPOCHS epochs (a longer schedule, the paper's 30-80 epochs, asks about under-training)."""
    epochs = int(cfg.get("optim", {}).get("epochs", EPOCHS))
    longer = () if epochs == EPOCHS else (f"{epochs} epochs",)
    return _row(cfg, folder_name) + longer


def _size(cfg: dict) -> str:
    """A baseline's size as its run name carries it: an adapter's bottleneck, a prefix method's special tokens."""
    method, adapter, prefix = cfg["method"], cfg.get("adapter") or {}, cfg.get("prefix") or {}
    if method in ADAPTER_METHODS and "r" in adapter:
        return f"r={adapter['r']}"
    if method in PREFIX_METHODS and "l_p" in prefix:
        return f"l_p={prefix['l_p']} l_i={prefix.get('l_i', 0)}"
    return ""


def _row(cfg: dict, folder_name: str) -> tuple:
    if cfg["method"] != "lora":
        size = _size(cfg)
        setting = f"{cfg['method']} {size}" if size else cfg["method"]
        prefix, max_len = cfg.get("prefix") or {}, cfg.get("data", {}).get("max_len")
        if cfg["method"].startswith("prefix_") and max_len is not None:
            text = int(max_len) - int(prefix.get("l_p", 0)) - int(prefix.get("l_i", 0))
            if text < TEXT_TOKENS:
                return (setting, f"text cut at {text} tokens")
        return (setting,)
    lora = cfg.get("lora", {})
    kind = "peft" if folder_name.startswith("peft_") else "lora"
    return (kind, int(lora.get("r", 8)), float(lora.get("alpha", 8)), tuple(lora.get("targets", ("q", "v"))))


def is_grid(p: GridPoint) -> bool:
    """Seed 0 of the method's grid setting (LoRA r=8 alpha=8 on q, v): what selects the learning rate."""
    return p.task in GRID_TASKS and p.seed == 0 and p.on_grid


def selected(points: list[GridPoint]) -> dict[tuple[str, str], GridPoint]:
    """Per (task, setting): the finished seed-0 grid point with the best dev metric; a tie (two rates with the same
    number of dev rows right) goes to the lower rate."""
    best: dict[tuple[str, str], GridPoint] = {}
    for p in sorted(filter(is_grid, points), key=lambda p: p.lr):
        key = (p.task, p.setting)
        if p.finished and (key not in best or p.best > best[key].best):
            best[key] = p
    return best


def grid_lrs(method: str) -> tuple[float, ...]:
    """The rates a method's grid must have run before its selected rate is settled."""
    return GRID_LRS.get(method) or BASELINE_LRS.get(method, DEFAULT_BASELINE_LRS)


def _finished_rates(points: list[GridPoint]) -> dict[tuple[str, str], set[float]]:
    """(task, setting) -> the rates whose seed-0 grid run has finished."""
    finished: dict[tuple[str, str], set[float]] = {}
    for p in points:
        if is_grid(p) and p.finished:
            finished.setdefault((p.task, p.setting), set()).add(p.lr)
    return finished


def unfinished_grids(points: list[GridPoint], chosen: dict[tuple[str, str], GridPoint]) -> set[tuple[str, str]]:
    """The (task, setting) pairs whose selected rate is not settled yet: a rate of the method's grid has not
    finished, or (a baseline) the best rate is the highest or the lowest one tried, where the protocol doubles or
    halves the rate again until the best has a worse rate on either side."""
    finished = _finished_rates(points)
    return {
        (t, m)
        for (t, m), p in chosen.items()
        if not set(grid_lrs(p.method)) <= finished.get((t, m), set())
        or (p.method not in GRID_LRS and p.lr in (min(finished[(t, m)]), max(finished[(t, m)])))
    }


def tuned_keys(points: list[GridPoint]) -> set[tuple[str, str]]:
    """The (task, setting) pairs whose rate was selected among several: LoRA and FT always (their grids are the
    protocol), a baseline once two or more of its seed-0 rates have finished on the task (before that its one
    rate is a choice, not a selection)."""
    return {key for key, lrs in _finished_rates(points).items() if key[1] in GRID_LRS or len(lrs) > 1}


def borrowed_rates(chosen: dict[tuple[str, str], GridPoint]) -> dict[str, float]:
    """Per method, the rate a task without a grid of its own (CoLA, SST-2) runs at: the middle (lower middle) of
    the rates selected on the grid tasks, so it is always a rate that was run and selected somewhere."""
    rates: dict[str, list[float]] = {}
    for (_, method), p in sorted(chosen.items()):
        rates.setdefault(method, []).append(p.lr)
    return {m: statistics.median_low(lrs) for m, lrs in rates.items() if m in GRID_LRS}


def lr_selection_table(results_dir: Path, out_dir: Path) -> str:
    points = [p for p in read_grid(results_dir) if is_grid(p)]
    chosen, tuned = selected(points), tuned_keys(points)
    commands = os.path.relpath(results_dir / "glue_minilm_lrsel" / "COMMANDS.md", out_dir)
    lines = [
        "# GLUE fidelity, step 1: learning-rate selection on seed 0 (generated by `python experiments/tables.py`)",
        "",
        "all-MiniLM-L6-v2, offline GLUE dev, `+exp=glue_minilm_lrsel` (10 epochs, batch 16, warmup 6%, weight decay",
        "0.1, max_len 128). Cell: best epoch's dev metric x100 (MRPC/RTE accuracy, STS-B Pearson), the epoch it came",
        "at (1-based) of those run; **bold** = the learning rate selected for the method (a tie: the lower rate).",
        f"A best epoch equal to the last one and {PLATEAU} points or more above every earlier epoch (⚠) means the run",
        "may be under-trained; ≈ marks a last-epoch best within that of an earlier epoch (a plateau). Runs still",
        "training are marked and never selected.",
        f"How the runs were made: [COMMANDS.md]({commands}).",
        "",
        "| task | method | lr | best dev | best epoch / run | status |",
        "|---|---|---|---|---|---|",
    ]
    for p in sorted(points, key=lambda p: (list(TITLES).index(p.task) if p.task in TITLES else 99, p.setting, p.lr)):
        score = f"{100 * p.best:.1f}"
        if chosen.get((p.task, p.setting)) is p and (p.task, p.setting) in tuned:
            score = f"**{score}**"
        last = f" {p.epoch_mark}" if p.finished and p.epoch_mark else ""
        status = "finished" if p.finished else f"training ({len(p.scores)}/{p.epochs} epochs)"
        link = f"[{p.lr:g}]({os.path.relpath(p.folder, out_dir)})"
        lines.append(f"| {TITLES.get(p.task, p.task)} | {METHODS.get(p.setting, p.setting)} | {link} | {score} | "
                     f"{p.best_epoch + 1}{last} / {len(p.scores)} | {status} |")  # fmt: skip
    if not points:
        lines.append("| - | - | - | no run has evaluated yet | - | - |")
    picks = {key: p for key, p in sorted(chosen.items()) if key in tuned}  # a baseline at one lr: nothing selected
    if picks:
        training = {key: sum(not p.finished for p in points if (p.task, p.setting) == key) for key in picks}
        caveat = "a grid point still training, or not started, can still win"
        lines += ["", f"Selected among finished runs ({caveat}): " + "; ".join(
            f"{TITLES.get(t, t)} {METHODS.get(m, m)} lr {p.lr:g} ({100 * p.best:.1f})"
            + (f", provisional: {training[(t, m)]} still training" if training[(t, m)] else "")
            for (t, m), p in picks.items()
        ) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def tuned_runs(points: list[GridPoint]) -> dict[tuple[str, tuple], list[GridPoint]]:
    """(task, variant) -> the finished runs (one per seed) at the learning rate selected for the variant's method."""
    chosen = selected(points)
    shared = borrowed_rates(chosen)
    runs: dict[tuple[str, tuple], list[GridPoint]] = {}
    for p in points:
        pick = chosen[(p.task, p.setting)].lr if (p.task, p.setting) in chosen else None
        rate = pick if p.task in GRID_TASKS else shared.get(p.setting)
        if p.method not in GRID_LRS and not p.on_grid:  # a baseline row off the grid: at the rate it ran
            rate = p.lr
        if p.finished and rate is not None and p.lr == rate:
            runs.setdefault((p.task, p.variant), []).append(p)
    return {k: sorted(v, key=lambda p: p.seed) for k, v in runs.items()}
