# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Comparing runs of one experiment
#
# `experiments/run.py` writes one folder per run: `results/<exp>/<task>/<run>/` with `config.yaml` (the resolved
# config), `train.jsonl` (loss and learning rate every few steps), `metrics.jsonl` (dev metrics after every
# epoch) and, once finished, `summary.json` (best epoch, trainable parameters, wall time, git commit). Runs that
# differ only in `_seed<k>` form a group; the paper reports the median over 5 seeds.
#
# This notebook reads every run folder of one experiment, finished or still running, and shows
# 1. a table of the runs and how far each got,
# 2. per task, the dev metric after every epoch and the training loss, one colour per group,
# 3. the median over seeds of each group's best epoch (the numbers `experiments/tables.py` puts in the paper's
#    tables; the grouping is `experiments/aggregate.py`'s, reused here),
# 4. the same curves from the Weights & Biases API, when the runs were logged there (`logger=wandb`) and
#    `WANDB_PROJECT` is set.

# %% tags=["parameters"]
RESULTS_DIR = None  # the results folder; None: <checkout>/results
EXP = "glue_minilm"  # the experiment: results/<EXP>/<task>/<run>/
OUT = "compare_out"  # plots (PNG) and tables (markdown) go here
WANDB_PROJECT = None  # e.g. "lora_jax" (conf/logger/wandb.yaml); None: skip the wandb section
WANDB_ENTITY = None  # wandb user or team; None: your default entity

# %%
# ruff: noqa: E402 -- a notebook imports after its parameters cell
import json
import os
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files first; shown inline below through IPython.display
import matplotlib.pyplot as plt
import yaml
from matplotlib.ticker import MaxNLocator

import lora_jax
from lora_jax.logging import read_jsonl

ROOT = Path(lora_jax.__file__).resolve().parents[1]  # the checkout: experiments/ sits beside lora_jax/
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "notebooks"))
from aggregate import Group, group_runs, load_summaries  # experiments/aggregate.py
from nb_display import show_markdown, show_png  # notebooks/nb_display.py

results_dir = Path(RESULTS_DIR) if RESULTS_DIR is not None else ROOT / "results"
exp_dir = results_dir / EXP
if not exp_dir.is_dir():
    raise FileNotFoundError(f"No experiment folder {exp_dir}; set RESULTS_DIR and EXP (results/<exp>/<task>/<run>).")
out = Path(OUT)
out.mkdir(parents=True, exist_ok=True)


# %% [markdown]
# ## The runs
#
# A run folder is any `<task>/<run>/` with a `config.yaml`. A run with no `summary.json` is still going (or
# died): its curves show the epochs it has logged so far, and it stays out of the medians.


# %%
def read_run(folder: Path) -> dict:
    """One run as aggregate.py's summaries look (exp, task, run, seed, ...), plus its logged records."""
    config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {
        "exp": folder.parents[1].name,
        "task": folder.parent.name,
        "run": folder.name,  # the folder's name, as in summary.json (a PEFT run's has a peft_ prefix)
        "seed": summary.get("seed", config.get("seed", 0)),
        "method": summary.get("method", config.get("method", "?")),
        "main_metric": summary.get("main_metric"),
        "best": summary.get("best"),
        "finished": bool(summary),
        "folder": str(folder),
        "metrics": read_jsonl(folder / "metrics.jsonl"),
        "train": read_jsonl(folder / "train.jsonl"),
    }


runs = [read_run(path.parent) for path in sorted(exp_dir.glob("*/*/config.yaml"))]
if not runs:
    raise FileNotFoundError(f"No run folders (<task>/<run>/config.yaml) under {exp_dir}.")
groups = group_runs(runs)  # every run, finished or not, grouped as aggregate.py groups summaries


def main_metric(task: str, runs: list[dict]) -> str:
    """The metric the paper reports for `task`: from a finished run's summary, else the GLUE task registry."""
    named = [r["main_metric"] for r in runs if r["task"] == task and r["main_metric"]]
    if named:
        return named[0]
    from lora_jax.data.glue import TASKS

    if task in TASKS:
        return TASKS[task].main_metric
    records = [rec for r in runs if r["task"] == task for rec in r["metrics"]]
    return next((k for rec in records for k in rec if k not in ("step", "epoch")), "?")


def metric_value(record: dict, metric: str) -> float | None:
    """A record's `metric`; with several dev sets (MNLI) the first one's, logged as '<split>/<metric>'."""
    if metric in record:
        return record[metric]
    return next((v for k, v in record.items() if k.endswith("/" + metric)), None)


tasks = sorted({r["task"] for r in runs})
metrics = {task: main_metric(task, runs) for task in tasks}
rows = ["| task | run | method | seed | status | epochs logged | last dev metric | best |", "|---" * 8 + "|"]
for r in sorted(runs, key=lambda r: (r["task"], r["run"])):
    last = metric_value(r["metrics"][-1], metrics[r["task"]]) if r["metrics"] else None
    status = "finished" if r["finished"] else "running or stopped"
    rows.append(f"| {r['task']} | {r['run']} | {r['method']} | {r['seed']} | {status} | {len(r['metrics'])} | "
                + (f"{metrics[r['task']]} {last:.4f}" if last is not None else "-") + " | "
                + (f"{r['best']:.4f}" if r["best"] is not None else "-") + " |")  # fmt: skip
runs_md = f"{len(runs)} runs of {EXP} in {exp_dir}\n\n" + "\n".join(rows)
(out / "runs.md").write_text(runs_md + "\n")
show_markdown(runs_md)

# %% [markdown]
# ## Per-epoch dev metric and training loss, per task
#
# Left: the dev metric after each epoch, a thin line per seed and a thick line for the median over the seeds
# that reached that epoch. Right: the training loss as logged every `optim.log_every` steps. One colour per
# group (LoRA, full fine-tuning, the PEFT+torch reference ...).


# %%
def plot_task(task: str, task_groups: list[Group], metric: str, path: Path) -> Path:
    fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    for colour, group in zip(plt.cm.tab10.colors, task_groups, strict=False):
        curves = [[(rec["epoch"], metric_value(rec, metric)) for rec in r["metrics"]] for r in group.runs]
        curves = [[(e, v) for e, v in curve if v is not None] for curve in curves]
        for curve in curves:
            if curve:
                ax_metric.plot(*zip(*curve, strict=True), color=colour, alpha=0.35, lw=1, marker=".")
        epochs = sorted({e for curve in curves for e, _ in curve})
        medians = [statistics.median(v for curve in curves for e2, v in curve if e2 == e) for e in epochs]
        if epochs:
            ax_metric.plot(epochs, medians, color=colour, lw=2.5, marker="o",
                           label=f"{group.name} (n={len(group.runs)})")  # fmt: skip
        for i, r in enumerate(group.runs):
            losses = [(rec["step"], rec["loss"]) for rec in r["train"] if "loss" in rec]
            if losses:
                ax_loss.plot(*zip(*losses, strict=True), color=colour, alpha=0.6, lw=1,
                             label=group.name if i == 0 else None)  # fmt: skip
    ax_metric.set(xlabel="epoch", ylabel=f"dev {metric}", title=f"{task}: dev {metric} per epoch")
    ax_metric.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set(xlabel="step", ylabel="training loss", title=f"{task}: training loss")
    ax_metric.legend(fontsize=8)
    if ax_loss.lines:
        ax_loss.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


for task in tasks:
    show_png(plot_task(task, [g for g in groups if g.task == task], metrics[task], out / f"epochs_{task}.png"))

# %% [markdown]
# ## Median over seeds
#
# Finished runs only (`aggregate.load_summaries`: a `summary.json` with a best epoch), grouped by
# `aggregate.group_runs`. This is `python experiments/aggregate.py exp=<EXP>` with the cost columns added:
# trainable parameters, and the median wall time and throughput over the seeds.


# %%
def median_table(finished: list[Group]) -> str:
    rows = ["| task | run | metric | median | n | seeds | trainable params | wall time (min) | tokens/s |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for g in finished:
        first = g.runs[0]
        wall = [r["wall_time_s"] / 60 for r in g.runs if r.get("wall_time_s")]
        speed = [r["tokens_per_s"] for r in g.runs if r.get("tokens_per_s")]
        rows.append(f"| {g.task} | {g.name} | {first['main_metric']} | {g.median:.4f} | {len(g.runs)} | "
                    + " ".join(f"{s:.4f}" for s in g.scores) + " | "
                    + (f"{first['trainable_params']:,}" if first.get("trainable_params") else "-") + " | "
                    + (f"{statistics.median(wall):.1f}" if wall else "-") + " | "
                    + (f"{statistics.median(speed):.0f}" if speed else "-") + " |")  # fmt: skip
    return "\n".join(rows)


finished = group_runs(load_summaries(results_dir, EXP))
medians_md = f"Median over seeds, {EXP} ({sum(len(g.runs) for g in finished)} finished runs)\n\n"
medians_md += median_table(finished) if finished else "No finished runs yet (no summary.json with a best epoch)."
(out / "medians.md").write_text(medians_md + "\n")
show_markdown(medians_md)

# %% [markdown]
# ## The same from Weights & Biases
#
# Runs logged with `logger=wandb` sit in wandb groups named `<exp>/<task>`, one run per run folder, with the
# dev metrics under `metrics/<name>` and the summary's numbers in the run summary. This section reads them back
# through the wandb API (it needs a network and a logged-in wandb), so runs made on other machines can be
# compared without copying their folders. Offline, or with `WANDB_PROJECT = None`, it says so and skips.


# %%
def wandb_runs(project: str, entity: str | None, exp: str) -> list[dict]:
    """Runs of `exp` from the wandb API, shaped like `read_run`'s records."""
    import wandb

    api = wandb.Api(timeout=30)
    found = api.runs(f"{entity}/{project}" if entity else project, filters={"group": {"$regex": f"^{exp}/"}})
    records = []
    for run in found:
        task = run.group.split("/", 1)[1]
        history = [
            {k.removeprefix("metrics/"): v for k, v in row.items() if k.startswith("metrics/") and v is not None}
            for row in run.scan_history()
        ]
        summary = dict(run.summary)
        records.append({"exp": exp, "task": task, "run": run.name, "seed": run.config.get("seed", 0),
                        "method": run.config.get("method", "?"), "main_metric": summary.get("main_metric"),
                        "best": summary.get("best"), "finished": run.state == "finished",
                        "metrics": [h for h in history if "epoch" in h and len(h) > 1], "train": []})  # fmt: skip
    return records


def wandb_skip_reason() -> str | None:
    if WANDB_PROJECT is None:
        return "WANDB_PROJECT is None"
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled"):
        return f"WANDB_MODE={os.environ['WANDB_MODE']} (no network)"
    try:
        import wandb  # noqa: F401
    except ImportError:
        return "wandb is not installed"
    return None


reason = wandb_skip_reason()
if reason is None:
    try:
        remote = wandb_runs(WANDB_PROJECT, WANDB_ENTITY, EXP)
    except Exception as e:  # no network, not logged in, no such project: the local results above still stand
        reason = f"the wandb API failed ({type(e).__name__}: {e})"
if reason is not None:
    print(f"wandb: skipped, {reason}.")
else:
    print(f"wandb: {len(remote)} runs of {EXP} in {WANDB_PROJECT}")
    remote_groups = group_runs(remote)
    for task in sorted({r["task"] for r in remote}):
        path = out / f"wandb_epochs_{task}.png"
        show_png(plot_task(task, [g for g in remote_groups if g.task == task], main_metric(task, remote), path))
    remote_finished = group_runs([r for r in remote if r["finished"] and r["best"] is not None])
    show_markdown("wandb, median over seeds\n\n" + median_table(remote_finished))

# %%
print(f"outputs in {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
