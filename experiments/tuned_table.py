"""The GLUE fidelity protocol, step 2 (issue 19): the seeds run at each method's selected rate as one table, and the
computed verdict per task (is tuned LoRA within a point of tuned full fine-tuning? do its seeds settle it?), with
what the runs say about why where it is not. Step 1, the grid and the selection, is lr_selection.py."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import NamedTuple

import scipy.stats
from lr_selection import (
    DEV_ROWS,
    GRID_LRS,
    GRID_TASKS,
    GRID_VARIANT,
    METHODS,
    PLATEAU,
    TITLES,
    WITHIN,
    GridPoint,
    borrowed_rates,
    is_grid,
    read_grid,
    selected,
    tuned_keys,
    tuned_runs,
    unfinished_grids,
)


def _variant_title(variant: tuple) -> str:
    if variant[0] not in ("lora", "peft"):
        return {"full": "FT (tuned)"}.get(variant[0], variant[0]) + "".join(f", {v}" for v in variant[1:])
    kind, r, alpha, targets, *longer = variant
    where = "all linear" if list(targets) in (["all-linear"], ["q", "k", "v", "o", "mlp"]) else ",".join(targets)
    where += "".join(f", {v}" for v in longer)
    if kind == "peft":
        return f"PEFT+torch LoRA r={r} α={alpha:g} {where} (at LoRA's tuned lr)"
    return f"LoRA r={r} α={alpha:g} {where} (tuned lr)"


def _cell(runs: list[GridPoint], out_dir: Path) -> str:
    scores = [100 * p.best for p in runs]
    links = " ".join(f"[{p.seed}]({os.path.relpath(p.folder, out_dir)})" for p in runs)
    spread = f" {min(scores):.1f}–{max(scores):.1f}" if len(runs) > 1 else ""
    epochs = ",".join(f"{p.best_epoch + 1}{p.epoch_mark}" for p in runs)
    return f"{statistics.median(scores):.1f} <sub>n={len(runs)}{spread}, best ep {epochs} {links}</sub>"


def tuned_section(results_dir: Path, out_dir: Path) -> list[str]:
    """The tuned-protocol table (rows: FT, LoRA q,v and any other LoRA variant run at LoRA's selected lr) and one
    computed verdict per task, as markdown lines; empty when no learning rate has been selected yet."""
    points = read_grid(results_dir)
    runs = tuned_runs(points)
    if not runs:
        return []
    tasks = [t for t in TITLES if any(task == t for task, _ in runs)]
    order = lambda v: (v[0] != "full", v != GRID_VARIANT["lora"], v[0] == "peft", str(v))  # noqa: E731
    variants = sorted({v for _, v in runs}, key=order)
    chosen, tuned = selected(points), tuned_keys(points)
    unsettled = unfinished_grids(points, chosen)
    shared = borrowed_rates(chosen)
    others = [TITLES[t] for t in tasks if t not in GRID_TASKS]
    unsettled |= {(t, m) for t in tasks if t not in GRID_TASKS for m in shared if any(k[1] == m for k in unsettled)}
    lines = [
        "## Tuned protocol: each method at its own learning rate, 10 epochs, best epoch on dev",
        "",
        "`+exp=glue_minilm_lrsel`: the learning rate of each method selected on seed 0 "
        "([glue_lr_selection.md](glue_lr_selection.md)), then seeds at that rate. Cell: median over seeds of the",
        "best epoch's dev metric x100, n = seeds, min–max, each seed's best epoch (⚠ = the last of 10 and still",
        f"rising, ≈ = the last of 10 but within {PLATEAU} points of an earlier epoch), links to the runs.",
        "Selected: "
        + "; ".join(
            f"{TITLES.get(t, t)} {METHODS.get(m, m)} {p.lr:g}" + (" (grid unfinished)" if (t, m) in unsettled else "")
            for (t, m), p in sorted(chosen.items())
            if (t, m) in tuned
        )
        + (
            f"; {', '.join(others)} (no grid of {'its' if len(others) == 1 else 'their'} own): the middle of each "
            "method's selected rates, " + ", ".join(f"{METHODS.get(m, m)} {lr:g}" for m, lr in sorted(shared.items()))
            if others
            else ""
        )
        + ".",
        "",
        "| method | trainable | " + " | ".join(TITLES[t] for t in tasks) + " |",
        "|" + "---|" * (len(tasks) + 2),
    ]
    for v in variants:
        cells = [_cell(runs[(t, v)], out_dir) if (t, v) in runs else "no run" for t in tasks]
        some = [p for t in tasks for p in runs.get((t, v), [])]
        title = _variant_title(v)
        tried = sorted({p.lr for p in points if is_grid(p) and p.variant == v and p.finished})
        if v[0] not in (*GRID_LRS, "peft") and len(tried) > 1:  # a baseline with a grid of its own
            title += " (lr per task selected on seed 0 among " + ", ".join(f"{lr:g}" for lr in tried) + ")"
        elif v[0] not in (*GRID_LRS, "peft"):  # a baseline run at one learning rate: not selected among several
            title += " (one lr: " + ", ".join(sorted({f"{p.lr:g}" for p in some})) + ", not tuned)"
        counts = "/".join(sorted({f"{p.trainable:,}" for p in some if p.trainable})) or "—"
        lines.append(f"| {title} | {counts} | " + " | ".join(cells) + " |")
    lines += ["", *verdicts(runs, tasks, unsettled), *diagnoses(runs, tasks), *anchors(runs, tasks)]
    return lines


def median_best(runs: list[GridPoint]) -> float:
    """The median over seeds of each run's best dev metric, in points: what a verdict compares."""
    return statistics.median(100 * p.best for p in runs)


def diagnoses(runs: dict[tuple[str, tuple], list[GridPoint]], tasks: list[str]) -> list[str]:
    """Where tuned LoRA trails FT by more than WITHIN, what its runs say about why: under-training (do its seeds
    peak at the last epoch? does the same row on a longer schedule come within WITHIN of FT?) and capacity (does
    another LoRA row at the same rate, such as all linear layers, a larger α or a larger r, come within WITHIN?)."""
    lines, med = [], median_best
    for t in tasks:
        ft, lora = runs.get((t, GRID_VARIANT["full"])), runs.get((t, GRID_VARIANT["lora"]))
        if not ft or not lora or med(lora) - med(ft) >= -WITHIN:
            continue
        last = sum(p.best_epoch == len(p.scores) - 1 for p in lora)
        why = [f"under-training: {last} of {len(lora)} LoRA seeds peak at the last of {lora[0].epochs} epochs "
               f"(best epochs {','.join(f'{p.best_epoch + 1}{p.epoch_mark}' for p in lora)})"]  # fmt: skip
        others = sorted(v for (task, v) in runs if task == t and v[0] == "lora" and v != GRID_VARIANT["lora"])
        closes = {v: _closes(runs[(t, v)], ft) for v in others}
        longer = [closes[v] for v in others if v[:4] == GRID_VARIANT["lora"]]  # same row, another schedule
        wider = [closes[v] for v in others if v[:4] != GRID_VARIANT["lora"]]
        why[0] += "".join(f"; {c}" for c in longer)
        why.append("capacity: " + ("; ".join(wider) if wider else "no other LoRA row run yet"))
        lines.append(f"- Why LoRA trails on {TITLES[t]} (FT {med(ft):.1f}): " + "; ".join(why) + ".")
    return ["", *lines] if lines else []


def _closes(variant: list[GridPoint], ft: list[GridPoint]) -> str:
    """A LoRA row against FT on the seeds the row has (FT's other seeds would make the comparison another one)."""
    seeds = {p.seed for p in variant}
    same = [p for p in ft if p.seed in seeds] or ft
    against = "" if len(same) == len(ft) else f"FT {median_best(same):.1f} on the same seeds: "
    verdict = "closes it" if median_best(variant) - median_best(same) >= -WITHIN else "does not close it"
    title = _variant_title(variant[0].variant).removesuffix(" (tuned lr)")
    return f"{title} {median_best(variant):.1f} (n={len(variant)}, {against}{verdict})"


def anchors(runs: dict[tuple[str, tuple], list[GridPoint]], tasks: list[str]) -> list[str]:
    """The correctness check per task: is lora_jax's LoRA median inside the PEFT+torch reference's seed range at
    the same setting (same config, batches and learning rate)?"""
    lines = []
    for t in tasks:
        ours, ref = runs.get((t, GRID_VARIANT["lora"])), runs.get((t, ("peft", *GRID_VARIANT["lora"][1:])))
        if not ours or not ref:
            continue
        med = median_best(ours)
        lo, hi = min(100 * p.best for p in ref), max(100 * p.best for p in ref)
        ok = lo <= med <= hi
        note = f" (provisional: {len(ref)} PEFT seed(s), not 3)" if len(ref) < 3 else ""
        lines.append(
            f"- {TITLES[t]}: lora_jax LoRA inside the PEFT+torch seed range: **{'yes' if ok else 'no'}** — lora_jax "
            f"{med:.1f} (n={len(ours)}), PEFT+torch {lo:.1f}–{hi:.1f} (n={len(ref)}){note}."
        )
    return ["", *lines] if lines else []


class GapInterval(NamedTuple):
    """The 95% confidence interval of the mean LoRA − FT gap over seeds, in points."""

    low: float
    high: float

    @property
    def settled(self) -> str | None:
        """What the interval shows, or None when it straddles the WITHIN-point line (too few seeds to tell)."""
        if self.low >= -WITHIN:
            return f"the seeds show LoRA within {WITHIN:g}"
        return f"the seeds show LoRA trails by more than {WITHIN:g}" if self.high < -WITHIN else None

    def __str__(self) -> str:
        shows = self.settled or "too few seeds to settle it either way"
        return f"; mean gap's 95% CI over seeds {self.low:+.1f} to {self.high:+.1f} (Welch t): {shows}"


def seed_interval(lora: list[GridPoint], ft: list[GridPoint]) -> GapInterval | None:
    """Welch's t interval of the mean gap, and so whether the seeds settle the verdict: a median gap says where the
    seeds sit, the interval says whether this many seeds can tell. None with under 2 seeds a side or no spread."""
    if min(len(lora), len(ft)) < 2:
        return None
    a, b = [100 * p.best for p in lora], [100 * p.best for p in ft]
    if statistics.pvariance(a) + statistics.pvariance(b) == 0:
        return None
    ci = scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return GapInterval(float(ci.low), float(ci.high))


def verdicts(
    runs: dict[tuple[str, tuple], list[GridPoint]], tasks: list[str], unsettled: set[tuple[str, str]] = frozenset()
) -> list[str]:
    """One line per task with both tuned rows, and the sentence of what reproduced: LoRA q,v within WITHIN
    points of FT (median against median), with the seed ranges, the seed counts and, on an accuracy task, how
    many dev rows the gap is (RTE's 277 rows make one row 0.36 points). A task is provisional with
    fewer than 3 seeds a side or a learning-rate grid (`unsettled`) not finished."""
    lines, held, failed, sure, unsure = [], [], [], [], []
    for t in tasks:
        ft, lora = runs.get((t, GRID_VARIANT["full"])), runs.get((t, GRID_VARIANT["lora"]))
        if not ft or not lora:
            continue
        med = median_best
        rng = lambda rs: (  # noqa: E731
            f", range {min(100 * p.best for p in rs):.1f}–{max(100 * p.best for p in rs):.1f}" if len(rs) > 1 else ""
        )
        gap, interval = med(lora) - med(ft), seed_interval(lora, ft)
        ok = gap >= -WITHIN
        why = [f"{min(len(ft), len(lora))} seed(s), not 3"] if min(len(ft), len(lora)) < 3 else []
        why += ["learning-rate grid unfinished"] if {(t, "full"), (t, "lora")} & set(unsettled) else []
        note = f" (provisional: {'; '.join(why)})" if why else ""
        rows = f"; {abs(gap) * DEV_ROWS[t] / 100:.0f} of {DEV_ROWS[t]} dev rows" if t in DEV_ROWS else ""
        lines.append(
            f"- {TITLES[t]}: LoRA within {WITHIN:g} point of FT: **{'yes' if ok else 'no'}** — gap {gap:+.1f}{rows} "
            f"(LoRA {med(lora):.1f}, n={len(lora)}{rng(lora)}; FT {med(ft):.1f}, n={len(ft)}{rng(ft)}){note}"
            f"{interval or ''}."
        )
        (held if ok else failed).append(f"{TITLES[t]} {gap:+.1f}" + ("*" if why else ""))
        if interval:
            (sure if interval.settled else unsure).append(TITLES[t])
    if lines:
        starred = any(x.endswith("*") for x in held + failed)
        sentence = (f"Under the tuned protocol the paper's claim (LoRA matches full fine-tuning) holds on "
                    f"{', '.join(held) or 'no task'} and fails on {', '.join(failed) or 'no task'} (LoRA − FT, "
                    f"points{'; * provisional, as above' if starred else ''}).")  # fmt: skip
        if sure or unsure:
            sentence += (f" The seeds' 95% intervals settle {', '.join(sure) or 'no task'}; "
                         f"{', '.join(unsure) or 'no task'} would need more seeds.")  # fmt: skip
        lines += ["", sentence]
    return lines
