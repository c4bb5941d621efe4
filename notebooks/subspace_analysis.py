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
# # What do LoRA adapters learn? The paper's Section 7 on saved adapters
#
# LoRA writes the update of a frozen kernel W (d_in x d_out, `y = x W`) as `delta W = scale * A B`, with
# A: d_in x r and B: r x d_out. Section 7 of the paper asks three questions of trained adapters:
#
# 1. **Figure 3.** Do the top directions of A learned with r = 8 appear in A learned with r = 64? The measure is
#    the normalised subspace similarity
#    `phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)` in [0, 1], with U1, U2 the input-space
#    singular vectors of A1 and A2 sorted by singular value.
# 2. **Figure 4.** The same between two seeds at one rank, beside two random Gaussian matrices (the control).
# 3. **Table 7.** Does delta W amplify directions W already has? Project W onto the top-r singular directions
#    of delta W, of W itself, and of a random matrix; the amplification factor is
#    `||delta W||_F / ||U^T W V||_F` (U, V from delta W).
#
# The numbers come from `lora_jax.analysis` (plain numpy); the run-folder plumbing (reading adapters, finding W
# in the base model) is reused from `experiments/analyze.py`, the command-line version of this notebook.
#
# Set `RUN_A` and `RUN_B` to two run folders (`results/<exp>/<task>/<run>`, each with `adapter/` and
# `config.yaml`), e.g. an r = 8 and an r = 64 run, or two seeds. Left at `None`, the notebook trains two tiny
# adapters on a random 2-layer BERT first, so it runs anywhere in a few seconds: those figures show the
# mechanics, not the paper's findings.

# %% tags=["parameters"]
RUN_A = None  # run folder, e.g. "../results/glue_minilm/mrpc/lora_r8_a8_seed0"; None: a tiny demo run
RUN_B = None  # a second run of the same model and targets (another rank or seed)
OUT = "subspace_out"  # figures (PNG) and tables (markdown, JSON) go here
LAYER = None  # the layer shown in the figures and Table 7; None: the middle adapted layer
CROP = None  # also draw the figures zoomed to i, j <= CROP (the paper's zoomed panels), e.g. 8
BASE = None  # base model folder overriding the runs' config.yaml model.name_or_path (Table 7 needs W)
SEED = 0  # random Gaussian control and Table 7's random subspaces

# %%
# ruff: noqa: E402 -- a notebook imports after its parameters cell
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

import lora_jax
from lora_jax.analysis import (
    adapter_similarity,
    amplification,
    by_kind,
    expected_random_similarity,
    mean_over_layers,
    random_gaussian_control,
)
from lora_jax.analysis.plots import figure3, figure4

ROOT = Path(lora_jax.__file__).resolve().parents[1]  # the checkout: experiments/ sits beside lora_jax/
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "notebooks"))
import analyze  # experiments/analyze.py: read_factors, base_kernels, find_kernel, ...
from nb_display import show_markdown, show_png  # notebooks/nb_display.py

out = Path(OUT)
out.mkdir(parents=True, exist_ok=True)


# %% [markdown]
# ## Demo runs (only when RUN_A / RUN_B are None)
#
# A random 2-layer BERT (hidden size 64) written as a Hugging Face folder with `hub.to_pretrained`, loaded back
# with `hub.from_pretrained` as `experiments/run.py` does, then LoRA on W_q and W_v trained for a few hundred
# steps on a synthetic task (is a "signal" token among the first half of the sequence?) at two ranks and two
# seeds. Each run folder gets what the analysis reads: `adapter/` (`save_adapter`) and `config.yaml`.


# %%
def make_demo_runs(root: Path, ranks: tuple[int, int] = (4, 16), steps: int = 200) -> tuple[Path, Path]:
    import jax
    import optax
    from flax.traverse_util import unflatten_dict

    from lora_jax.adapters import save_adapter
    from lora_jax.lora import lora_wrap
    from lora_jax.methods import partition, trainable_mask, unpartition
    from lora_jax.models import bert, hub
    from lora_jax.models.spec import param_shapes
    from lora_jax.train import TrainState, make_steps

    config = bert.Config(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)  # fmt: skip
    seq = 12
    # transformers' init (N(0, 0.02) kernels and embeddings, LayerNorm 1, biases 0), drawn in numpy: no compile
    rng = np.random.default_rng(0)

    def draw(path: str, shape: tuple[int, ...]) -> np.ndarray:
        name = path.rsplit(".", 1)[-1]
        if name in ("kernel", "embedding"):
            return rng.normal(0.0, config.initializer_range, shape).astype(np.float32)
        return (np.ones if name == "scale" else np.zeros)(shape, np.float32)

    shapes = param_shapes(config, "base")
    init = unflatten_dict({tuple(path.split(".")): draw(path, leaf.shape) for path, leaf in shapes.items()})
    base_dir = hub.to_pretrained(config, init, root / "tiny_bert", task="base")
    module, params, _, _ = hub.from_pretrained(base_dir, task="sequence-classification", num_labels=2)

    ids = rng.integers(1, 64, size=(steps, 32, seq))
    labels = (ids[:, :, : seq // 2] < 8).any(axis=-1).astype(np.int32)  # tokens 1..7 are the signal
    runs = []
    for seed, r in enumerate(ranks):
        lora = hub.lora_config("bert", ("q", "v"), r=r, alpha=r, train_also=("classifier", "pooler"))
        wrapped = lora_wrap(params, lora, jax.random.key(seed))  # another seed: independent A inits
        trainable, frozen = partition(wrapped, trainable_mask(wrapped, lora))
        tx = optax.adam(3e-3)
        state = TrainState(trainable, tx.init(trainable), jax.numpy.zeros((), jax.numpy.int32))
        train_step = jax.jit(make_steps(module, tx, num_labels=2, seed=seed)[0])
        for step in range(steps):
            batch = {"input_ids": ids[step], "attention_mask": np.ones_like(ids[step]), "labels": labels[step],
                     "weights": np.ones(len(ids[step]), np.float32)}  # fmt: skip
            state, loss = train_step(state, frozen, batch)
        trainable = state.trainable
        run = root / "demo" / "task" / f"lora_r{r}_a{r}_seed{seed}"
        save_adapter(run / "adapter", unpartition(trainable, frozen), lora)
        run_config = {"model": {"name_or_path": str(base_dir)}, "lora": {"r": r, "alpha": r}, "seed": seed,
                      "method": "lora", "run": run.name}  # fmt: skip
        (run / "config.yaml").write_text(yaml.safe_dump(run_config))
        print(f"{run.name}: final training loss {float(loss):.3f} (chance: {np.log(2):.3f})")
        runs.append(run)
    return runs[0], runs[1]


if RUN_A is None or RUN_B is None:
    RUN_A, RUN_B = make_demo_runs(Path(tempfile.mkdtemp(prefix="lora_jax_demo_")))

# %% [markdown]
# ## The adapters
#
# `read_factors` reads `adapter/adapter.safetensors` (checking its sha256) and returns one `LoraFactors` per
# adapted kernel: its path, the module kind (the path from the layer index on), the layer, A, B and the scale.

# %%
runs = [Path(RUN_A), Path(RUN_B)]
labels = tuple(analyze.run_labels(runs))
factors = [analyze.read_factors(run) for run in runs]
for label, run_factors in zip(labels, factors, strict=True):
    grouped = by_kind(run_factors)
    f = run_factors[0]
    layers = sorted(grouped[f.kind], key=lambda x: -1 if x is None else x)
    print(f"{label}: {len(run_factors)} adapted kernels, kinds {sorted(grouped)}, layers {layers}, "
          f"A {f.a.shape}, scale {f.scale:g}")  # fmt: skip

# %% [markdown]
# ## Figure 3: subspace similarity between the two adapters' A
#
# `adapter_similarity` gives phi(i, j) for every module both runs adapt, layer by layer. Read a heatmap from
# the top-left corner: phi(1, 1) near 1 means both runs found the same strongest input direction; for random
# subspaces phi(i, j) is only max(i, j) / d_in. The bottom row of the figure averages over layers.

# %%
phi = adapter_similarity(*factors)
layer = analyze.pick_layer(list(next(iter(phi.values()))), LAYER)
at_layer = {kind: layers[layer] for kind, layers in phi.items() if layer in layers}
mean = {kind: mean_over_layers(layers) for kind, layers in phi.items()}
d_in = next(f.a.shape[0] for f in factors[0] if f.kind in at_layer)
r1, r2 = next(iter(at_layer.values())).shape
suffixes = [""] if CROP is None else ["", f"_crop{CROP}"]
for suffix, crop in zip(suffixes, [None, CROP], strict=False):
    figure3(at_layer, mean, layer, out / f"fig3{suffix}.png", labels, crop)
    show_png(out / f"fig3{suffix}.png")

# %% [markdown]
# The paper's reading of Figure 3: the top direction of A_{r=8} lies largely inside A_{r=64} (phi(1, j) high),
# the rest much less, so a very low rank already captures most of what the update needs. The table gives the
# numbers behind the pictures beside what random subspaces of the same sizes would score.

# %%
k = min(r1, r2)
expected = expected_random_similarity(d_in, r1, r2)
rows = [f"| weight | layer | phi(1, 1) | phi(1, {r2}) | mean phi, i, j <= {k} | phi({r1}, {r2}) |", "|---" * 6 + "|",
        f"| random (expected) | | {expected[0, 0]:.3f} | {expected[0, -1]:.3f} | {expected[:k, :k].mean():.3f} | "
        f"{expected[-1, -1]:.3f} |"]  # fmt: skip
for kind, layers in phi.items():
    for name, m in [*layers.items(), ("mean", mean[kind])]:
        rows.append(f"| {kind} | {name} | {m[0, 0]:.3f} | {m[0, -1]:.3f} | {m[:k, :k].mean():.3f} | "
                    f"{m[-1, -1]:.3f} |")  # fmt: skip
subspace_md = f"phi({labels[0]}, {labels[1]}): d_in = {d_in}, r = {r1} vs {r2}\n\n" + "\n".join(rows)
(out / "subspace.md").write_text(subspace_md + "\n")
record = {"runs": [str(run) for run in runs], "labels": labels, "layer": layer, "d_in": d_in, "ranks": [r1, r2],
          "phi_at_layer": {kind: m.tolist() for kind, m in at_layer.items()}}  # fmt: skip
(out / "subspace.json").write_text(json.dumps(record))
show_markdown(subspace_md)

# %% [markdown]
# ## Figure 4: against a random Gaussian control
#
# The control is phi between two independent Gaussian d_in x r1 and d_in x r2 matrices: what "no shared
# structure" looks like at these sizes. Its average matches `expected_random_similarity` = max(i, j) / d_in.

# %%
control = random_gaussian_control(d_in, r1, r2, SEED)
print(f"random control: mean phi {control.mean():.3f} (expected {expected.mean():.3f}); "
      f"adapters at layer {layer}: " + ", ".join(f"{kind} {m.mean():.3f}" for kind, m in at_layer.items()))  # fmt: skip
for suffix, crop in zip(suffixes, [None, CROP], strict=False):
    figure4(at_layer, control, layer, out / f"fig4{suffix}.png", labels, crop)
    show_png(out / f"fig4{suffix}.png")

# %% [markdown]
# ## Table 7: does delta W amplify directions of W?
#
# Table 7 needs the frozen W, so the base model named in each run's `config.yaml` is loaded (`BASE` overrides
# it). For each run and weight at the chosen layer: `||U^T W V||_F` with U, V the top-r singular vectors of
# delta W, of W, and of a random matrix, and the amplification factor `||delta W||_F / ||U^T W V||_F`. The
# paper (GPT-3, layer 48, W_q) finds the delta W column far below the W column but well above random: delta W
# boosts directions W has but does not emphasise, by a factor of about 20 at r = 4. (The demo's W is a random
# init with ||W||_F near 1.3 that its trained delta W dwarfs, so its factors say nothing; use real runs.)

# %%
kernels_by_base: dict[str, dict] = {}
table7 = {}
for label, run, run_factors in zip(labels, runs, factors, strict=True):
    base = analyze.base_model_of(run, BASE)
    if base not in kernels_by_base:
        kernels_by_base[base] = analyze.base_kernels(base)
    for kind, layers in by_kind(run_factors).items():
        if layer in layers:
            f = layers[layer]
            stats = amplification(analyze.find_kernel(kernels_by_base[base], f), f.a, f.b, f.scale, rng=SEED)
            table7.setdefault(label, {})[kind] = stats.to_dict()

paper = yaml.safe_load((ROOT / "paper_tables" / "paper_numbers.yaml").read_text())["table7"]
rows = ["| run | weight | r | U, V from delta W | from W | random | ‖W‖_F | ‖delta W‖_F | amplification |",
        "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
for label, kinds in table7.items():
    for kind, s in kinds.items():
        rows.append(f"| {label} | {kind} | {s['r']} | {s['proj_delta']:.3f} | {s['proj_w']:.3f} | "
                    f"{s['proj_random']:.3f} | {s['w_norm']:.3f} | {s['delta_norm']:.3f} | "
                    f"{s['amplification']:.2f} |")  # fmt: skip
for r in ("r4", "r64"):
    p = paper["proj_norm"][r]
    rows.append(f"| paper: GPT-3 175B | W_q, layer 48 | {r[1:]} | {p['delta_w']} | {p['w']} | {p['random']} | "
                f"{paper['w_norm']} | {paper['delta_w_norm'][r]} | {paper['amplification_factor'][r]} |")  # fmt: skip
table7_md = f"Table 7 at layer {layer}\n\n" + "\n".join(rows)
(out / "table7.md").write_text(table7_md + "\n")
(out / "table7.json").write_text(json.dumps({"layer": layer, "runs": table7}, indent=2))
show_markdown(table7_md)

# %% [markdown]
# ## Next
#
# - Every layer at once, every pair of runs, and the figures at full size: `python experiments/analyze.py
#   runs=[<run A>,<run B>] out=results/analysis/<name>`; `python experiments/tables.py` puts its Table 7 into
#   `paper_tables/table7_amplification.md`.
# - phi depends on A only through its directions and their ordering (`lora_jax/analysis/subspace.py` explains the
#   invariances); the paper's own A is our `lora_a` transposed, which is why U comes from the left singular
#   vectors here.

# %%
print(f"outputs in {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
