"""LoRA against the paper's baselines under the tuned protocol (issue 17). The paper's claims are comparative:
at a comparable number of trainable parameters LoRA matches or beats adapters, prefix tuning and BitFit. One
computed line per task puts each baseline's median (at its own selected rate) beside LoRA q,v's, with Welch's
interval over seeds where both sides have two or more, and one sentence says where the claim holds."""

from __future__ import annotations

from pathlib import Path

from lr_selection import (
    DEV_ROWS,
    GRID_VARIANT,
    TITLES,
    WITHIN,
    GridPoint,
    read_grid,
    selected,
    tuned_keys,
    tuned_runs,
    unfinished_grids,
)
from tuned_table import median_best, seed_interval

BASELINES = {
    "adapter_h": "Adapter^H", "adapter_l": "Adapter^L", "adapter_p": "Adapter^P", "adapter_d": "Adapter^D",
    "prefix_embed": "PreEmbed", "prefix_layer": "PreLayer", "bitfit": "BitFit", "ft_top2": "FT^Top2",
}  # fmt: skip


def _side(name: str, runs: list[GridPoint]) -> str:
    scores = [100 * p.best for p in runs]
    spread = f" {min(scores):.1f}–{max(scores):.1f}" if len(runs) > 1 else ""
    return f"{name} {median_best(runs):.1f} (n={len(runs)}{spread}, {max(p.trainable for p in runs):,} trainable)"


def compare(task: str, lora: list[GridPoint], theirs: list[GridPoint], why: list[str]) -> tuple[str, bool, str]:
    """One baseline against LoRA on one task: the text, whether the claim holds (LoRA at most WITHIN points
    behind, median against median) and what the seeds' interval shows ("" when it cannot tell)."""
    gap = median_best(lora) - median_best(theirs)
    rows = f", {abs(gap) * DEV_ROWS[task] / 100:.0f} dev rows" if task in DEV_ROWS else ""
    interval = seed_interval(lora, theirs)
    shows = ""
    if interval is not None:
        if interval.low >= -WITHIN:
            shows, verdict = "within", f"the seeds show LoRA within {WITHIN:g} or ahead"
        elif interval.high < -WITHIN:
            shows, verdict = "behind", f"the seeds show LoRA behind by more than {WITHIN:g}"
        elif interval.high < 0:
            verdict = f"LoRA behind, the seeds cannot tell whether by more than {WITHIN:g}"
        else:
            verdict = "the seeds cannot tell"
        why = [f"95% CI {interval.low:+.1f} to {interval.high:+.1f}: {verdict}", *why]
    note = f" ({'; '.join(why)})" if why else ""
    return f"{_side('', theirs).strip()}: LoRA {gap:+.1f}{rows}{note}", gap >= -WITHIN, shows


def baseline_reading(results_dir: Path) -> list[str]:
    """Markdown lines (empty while no baseline has a selected rate and seeds on a task where LoRA has them)."""
    points = read_grid(results_dir)
    runs, chosen, tuned = tuned_runs(points), selected(points), tuned_keys(points)
    unsettled = unfinished_grids(points, chosen)
    lines, holds, fails, settled = [], [], [], []
    for task, title in TITLES.items():
        lora = runs.get((task, GRID_VARIANT["lora"]))
        rivals = sorted(
            (ps for (t, _), ps in runs.items() if t == task and ps[0].method in BASELINES and ps[0].on_grid
             and (t, ps[0].setting) in tuned),
            key=lambda ps: (list(BASELINES).index(ps[0].method), ps[0].setting),
        )  # each baseline setting (method and size) with a selected rate: its seeds at that rate  # fmt: skip
        if not lora or not rivals:
            continue
        parts = []
        for theirs in rivals:
            setting, name = theirs[0].setting, " ".join(filter(None, [BASELINES[theirs[0].method], theirs[0].size]))
            why = [f"{min(len(lora), len(theirs))} seed(s), not 3"] if min(len(lora), len(theirs)) < 3 else []
            why += ["grid unfinished"] if (task, setting) in unsettled else []
            text, ok, shows = compare(task, lora, theirs, why)
            parts.append(f"{name} {text}")
            (holds if ok else fails).append(f"{title} {name}" + ("*" if why else ""))
            settled += [f"{title} {name} ({shows})"] if shows else []
        lines.append(f"- {_side(f'{title}: LoRA q,v', lora)} against " + "; ".join(parts) + ".")
    if not lines:
        return []
    return [
        "",
        "### LoRA against the baselines",
        "",
        "LoRA − baseline, points (median over seeds, each method at its own selected rate; on an accuracy task also",
        "in dev rows); with 2+ seeds a side, Welch's 95% interval of the mean gap.",
        "",
        *lines,
        "",
        f"The paper's claim (LoRA within {WITHIN:g} point of each baseline, or ahead, at a comparable budget) holds "
        f"against {', '.join(holds) or 'none'} and fails against {', '.join(fails) or 'none'}"
        + ("; * provisional: fewer than 3 seeds or an unfinished grid" if any("*" in x for x in holds + fails) else "")
        + f". The seeds' intervals settle {', '.join(settled) or 'none of these'}.",
    ]
