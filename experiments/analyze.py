"""The paper's Section 7 analyses on saved runs: subspace similarity of A (Figures 3, 4) and Table 7.

    python experiments/analyze.py runs=[results/glue/mnli/lora_r8_a8_seed0,results/glue/mnli/lora_r64_a64_seed0]
    python experiments/analyze.py runs=[<r64 seed 0>,<r64 seed 1>] layer=3 weights=[query,value] out=analysis/seeds

For every pair of runs (in the order given) writes fig3_<a>__<b>.png (one layer and the mean over layers),
fig4_<a>__<b>.png (one layer beside a random Gaussian control) and subspace.{md,json}; for every run, Table 7's
projections at every layer in table7.{md,json}. Table 7 needs the frozen W, so it loads the base model named in
the run's config.yaml (`base=<folder>` overrides; `table7=false` skips it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from safetensors.numpy import load_file

from lora_jax.adapters import CONFIG, TENSORS
from lora_jax.analysis import (
    Amplification,
    LoraFactors,
    adapter_similarity,
    amplification,
    by_kind,
    expected_random_similarity,
    lora_factors,
    mean_over_layers,
    random_gaussian_control,
)
from lora_jax.config import model_folder, register_resolvers
from lora_jax.tree import leaf_paths, matches_module

register_resolvers()  # old runs' config.yaml may name the model as ${package_model:...}


# ---------------------------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------------------------


def adapter_dir(run: Path) -> Path:
    """A run folder's adapter/ (or the folder itself if it is an adapter folder)."""
    for folder in (run / "adapter", run):
        if (folder / TENSORS).is_file() and (folder / CONFIG).is_file():
            return folder
    raise FileNotFoundError(f"No adapter in {run}: expected adapter/{TENSORS} and adapter/{CONFIG} (a run folder).")


def read_factors(run: Path) -> list[LoraFactors]:
    """The adapted kernels of a run, straight from adapter.safetensors (no base model needed)."""
    folder = adapter_dir(run)
    meta = json.loads((folder / CONFIG).read_text())
    tensor_bytes = (folder / TENSORS).read_bytes()
    if "sha256" in meta and hashlib.sha256(tensor_bytes).hexdigest() != meta["sha256"]:
        raise ValueError(f"{folder / TENSORS} does not match its checksum in {CONFIG}: the file is corrupted.")
    lora = meta.get("lora_config", {})
    default_scale = lora["alpha"] / lora["r"] if "alpha" in lora and "r" in lora else None
    factors = lora_factors(load_file(str(folder / TENSORS)), default_scale)
    if not factors:
        raise ValueError(f"{folder / TENSORS} holds no lora_a/lora_b tensors; is it a LoRA run?")
    return factors


def run_labels(runs: Sequence[Path]) -> list[str]:
    """Short unique names: the run folder's name, or more of its path where names collide."""
    for depth in range(1, 5):
        labels = ["_".join(p.resolve().parts[-depth:]) for p in runs]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}_{p.name}" for i, p in enumerate(runs)]


def select(factors: list[LoraFactors], weights: Sequence[str] | None) -> list[LoraFactors]:
    if not weights:
        return factors
    chosen = [f for f in factors if any(matches_module(w, f.kind) for w in weights)]
    if not chosen:
        kinds = sorted({f.kind for f in factors})
        raise ValueError(f"weights={list(weights)} match none of the adapted kinds {kinds}.")
    return chosen


def pick_layer(layers: Sequence[Any], layer: int | None) -> Any:
    """The requested layer, or the middle one (the paper shows layer 48 of GPT-3's 96)."""
    layers = sorted(layers, key=lambda x: -1 if x is None else x)
    if layer is None:
        return layers[len(layers) // 2]
    if layer not in layers:
        raise ValueError(f"layer={layer} is not adapted; available layers: {layers}.")
    return layer


def base_kernels(name_or_path: str) -> dict[str, np.ndarray]:
    """{module path: 2-D kernel} of a base model (paths mirror HF names, as adapters' do)."""
    from lora_jax.models.hub import from_pretrained  # loads jax and the model family only when Table 7 runs

    _, params, _, _ = from_pretrained(model_folder(name_or_path), task="base")
    return {
        path.removeprefix("params.").removesuffix(".kernel"): np.asarray(leaf, np.float64)
        for path, leaf in leaf_paths(params)
        if path.endswith(".kernel") and np.ndim(leaf) == 2
    }


def find_kernel(kernels: Mapping[str, np.ndarray], factors: LoraFactors) -> np.ndarray:
    """W for an adapted module: same path, or one path a dotted suffix of the other (a head-less base model
    may drop a prefix such as GPT-2's "transformer."); a fused slice gets its columns of the kernel."""
    module = factors.module_path
    found = [k for k in kernels if k == module or module.endswith("." + k) or k.endswith("." + module)]
    if len(found) != 1:
        raise ValueError(f"Base model has {len(found)} kernels matching adapted module {module!r} "
                         f"({found[:4]}); pass the run's own base model with base=<folder>.")  # fmt: skip
    w = kernels[found[0]]
    if factors.slice_index is not None:
        width = factors.b.shape[1]
        w = w[:, factors.slice_index * width : (factors.slice_index + 1) * width]
    if w.shape != (factors.a.shape[0], factors.b.shape[1]):
        raise ValueError(f"{module}: kernel {w.shape} does not fit A {factors.a.shape} B {factors.b.shape}; "
                         "wrong base model (pass base=<folder>).")  # fmt: skip
    return w


def base_model_of(run: Path, override: str | None) -> str:
    if override:
        return str(override)
    config = run / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"No config.yaml in {run} to name the base model; pass base=<folder> or table7=false.")
    return str(OmegaConf.load(config).model.name_or_path)


# ---------------------------------------------------------------------------------------------------------------
# Analyses
# ---------------------------------------------------------------------------------------------------------------


def _fmt_layer(layer: Any) -> str:
    return "-" if layer is None else str(layer)


def subspace_pair(
    factors1: list[LoraFactors], factors2: list[LoraFactors], labels: tuple[str, str], cfg: DictConfig, out: Path
) -> tuple[dict[str, Any], list[str]]:
    """Figures 3 and 4 for one pair; returns (JSON record, markdown lines)."""
    from lora_jax.analysis.plots import figure3, figure4  # matplotlib only when figures are drawn

    phi = adapter_similarity(factors1, factors2)
    layer = pick_layer(list(next(iter(phi.values()))), cfg.layer)
    at_layer = {kind: layers[layer] for kind, layers in phi.items() if layer in layers}
    mean = {kind: mean_over_layers(layers) for kind, layers in phi.items()}
    d_in = next(f.a.shape[0] for f in factors1 if f.kind in at_layer)
    r1, r2 = next(iter(at_layer.values())).shape
    control = random_gaussian_control(d_in, r1, r2, cfg.seed)
    stem = f"{labels[0]}__{labels[1]}"
    paths = []
    for crop in [None, cfg.crop] if cfg.crop else [None]:
        suffix = f"_crop{crop}" if crop else ""
        paths.append(out / f"fig3_{stem}{suffix}.png")
        figure3(at_layer, mean, layer, paths[-1], labels, crop)
        paths.append(out / f"fig4_{stem}{suffix}.png")
        figure4(at_layer, control, layer, paths[-1], labels, crop)

    k = min(r1, r2)
    expected = expected_random_similarity(d_in, k, k)
    lines = [
        f"### {labels[0]} vs {labels[1]}",
        "",
        f"phi(i, j) of A's input-space directions (d_in = {d_in}, r = {r1} vs {r2}); random subspaces give "
        f"phi(1, 1) = {expected[0, 0]:.3f} and a mean of {expected.mean():.3f} over i, j <= {k}.",
        "",
        f"| weight | layer | phi(1, 1) | mean phi, i, j <= {k} | phi({r1}, {r2}) |",
        "|---|---|---|---|---|",
    ]
    record: dict[str, Any] = {"runs": list(labels), "layer": layer, "d_in": d_in, "ranks": [r1, r2],
                              "figures": [p.name for p in paths], "phi": {}}  # fmt: skip
    for kind, layers in phi.items():
        rows = [*((_fmt_layer(i), m) for i, m in layers.items()), ("mean", mean[kind])]
        for name, m in rows:
            lines.append(f"| {kind} | {name} | {m[0, 0]:.3f} | {m[:k, :k].mean():.3f} | {m[-1, -1]:.3f} |")
        record["phi"][kind] = {_fmt_layer(i): m.tolist() for i, m in layers.items()}
        record["phi"][kind]["mean"] = mean[kind].tolist()
    record["random_control"] = control.tolist()
    return record, [*lines, ""]


def table7_run(factors: list[LoraFactors], kernels: Mapping[str, np.ndarray], seed: int) -> dict[str, dict]:
    """{kind: {layer: Amplification}} for one run."""
    out: dict[str, dict] = {}
    for kind, layers in by_kind(factors).items():
        for layer, f in layers.items():
            stats = amplification(find_kernel(kernels, f), f.a, f.b, f.scale, rng=seed)
            out.setdefault(kind, {})[layer] = stats
    return out


def table7_markdown(results: Mapping[str, Mapping[str, Mapping[Any, Amplification]]], layer: int | None) -> list[str]:
    lines = ["## Table 7: ||U^T W V||_F with U, V the top-r singular vectors of delta W, W, or a random matrix", ""]
    kinds = sorted({kind for per_run in results.values() for kind in per_run})
    for kind in kinds:
        runs = {label: per_run[kind] for label, per_run in results.items() if kind in per_run}
        shown = pick_layer(list(next(iter(runs.values()))), layer)
        lines += [
            f"### {kind}, layer {_fmt_layer(shown)}",
            "",
            "| run | r | delta W | W | random | ‖W‖_F | ‖delta W‖_F | amplification |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, layers in runs.items():
            s = layers[shown]
            lines.append(f"| {label} | {s.r} | {s.proj_delta:.3f} | {s.proj_w:.3f} | {s.proj_random:.3f} | "
                         f"{s.w_norm:.3f} | {s.delta_norm:.3f} | {s.factor:.2f} |")  # fmt: skip
        all_layers = sorted({i for layers in runs.values() for i in layers}, key=lambda x: -1 if x is None else x)
        lines += ["", "Amplification factor by layer:", "",
                  "| run | " + " | ".join(_fmt_layer(i) for i in all_layers) + " |",
                  "|---|" + "---|" * len(all_layers)]  # fmt: skip
        for label, layers in runs.items():
            cells = [f"{layers[i].factor:.2f}" if i in layers else "" for i in all_layers]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Paper (GPT-3 175B, layer 48, W_q): see paper_tables/paper_numbers.yaml, table7.")
    return lines


def analyze(cfg: DictConfig) -> dict[str, Any]:
    runs = [Path(r) for r in (cfg.runs or [])]
    if not runs:
        raise ValueError("No runs given; pass runs=[<run folder>,<run folder>] (results/<exp>/<task>/<run>).")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = list(cfg.weights) if cfg.weights else None
    factors = [select(read_factors(run), weights) for run in runs]
    labels = run_labels(runs)
    summary: dict[str, Any] = {"runs": {label: str(run) for label, run in zip(labels, runs, strict=True)}}

    if len(runs) >= 2:
        records, lines = [], ["## Subspace similarity (Figures 3, 4)", ""]
        for i, j in itertools.combinations(range(len(runs)), 2):
            record, md = subspace_pair(factors[i], factors[j], (labels[i], labels[j]), cfg, out)
            records.append(record)
            lines += md
        (out / "subspace.json").write_text(json.dumps(records))
        (out / "subspace.md").write_text("\n".join(lines) + "\n")
        summary["subspace"] = [r["figures"] for r in records]

    if cfg.table7:
        cache: dict[str, dict[str, np.ndarray]] = {}
        results = {}
        for label, run, f in zip(labels, runs, factors, strict=True):
            name = base_model_of(run, cfg.base)
            if name not in cache:
                cache[name] = base_kernels(name)
            results[label] = table7_run(f, cache[name], cfg.seed)
        record = {label: {kind: {_fmt_layer(i): s.to_dict() for i, s in layers.items()}
                          for kind, layers in per_run.items()} for label, per_run in results.items()}  # fmt: skip
        (out / "table7.json").write_text(json.dumps(record, indent=2))
        (out / "table7.md").write_text("\n".join(table7_markdown(results, cfg.layer)) + "\n")
        summary["table7"] = "table7.md"
    print(f"analysis of {len(runs)} run(s) -> {out}: " + ", ".join(sorted(p.name for p in out.glob("*.*"))))
    return summary


@hydra.main(config_path="../conf", config_name="analyze", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        analyze(cfg)
    except (OSError, ValueError, KeyError) as e:
        if os.environ.get("LORA_JAX_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
