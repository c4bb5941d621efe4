"""LoRA as a transform of a parameter pytree (Hu et al. 2021, arXiv 2106.09685).

A frozen weight W (d_in x d_out) is adapted by a low-rank product: W x -> W x + (alpha / r) * B A x. In the
row-vector convention Flax uses (y = x @ W), that is y = x @ W + scale * (x @ A) @ B with

    A: lora_a  (d_in x r)   random init, so that gradients reach B from the first step
    B: lora_b  (r x d_out)  zeros, so that the adapted model starts exactly at the pretrained one

`lora_wrap` adds these leaves (and a scalar `lora_scale`, plus `lora_dropout` when `LoraConfig.dropout` > 0) beside
each targeted `kernel`; the model's LoRA-aware Dense (`lora_jax.layers.Dense`) sees them and adds the low-rank path.
The adapter's leaves are the whole truth about it: the layer reads rank, scale, dropout and slice layout from
them. Nothing here knows about any model family:
a target is a pattern over the dotted path of a module, e.g. `encoder.layer.3.attention.self.query`.

A fused kernel (GPT-2's `c_attn` holds q|k|v side by side) is described by `LoraConfig.fused`; its slices
become virtual child modules (`...c_attn.q`), each adaptable on its own, like loralib's MergedLinear.

Everything below is a pure function of pytrees.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.bottleneck import is_adapter_leaf
from lora_jax.prefix import is_prefix_leaf
from lora_jax.quant import is_quantized
from lora_jax.tree import (
    Params,
    combine,
    filter_leaves,
    leaf_paths,
    matches_module,
)

LORA_A, LORA_B, LORA_SCALE = "lora_a", "lora_b", "lora_scale"
LORA_SLICE = "lora_slice"  # position of an adapted slice inside a fused kernel (int32, never trained)
LORA_DROPOUT = "lora_dropout"  # dropout rate on the module's LoRA input (float32, never trained; only if > 0)
BOOKKEEPING = (LORA_SCALE, LORA_SLICE, LORA_DROPOUT)  # LoRA leaves that describe an adapter and never train
LORA_PREFIX = "lora_"
ALL_LINEAR = "all-linear"


class LoraError(ValueError):
    """Bad LoRA configuration or parameters; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how.

    targets: patterns over dotted module paths. A pattern is a regular expression that must match a whole
        trailing part of the path, starting at a component boundary: `query` matches `...self.query`,
        `attention.*dense` matches `...attention.output.dense`. `"all-linear"` adapts every 2-D kernel except
        those under `exclude`.
    init: `"kaiming"` (uniform +-1/sqrt(d_in) for A, as loralib and PEFT do) or `"gaussian"` (N(0, 1/r) for A,
        the paper's "random Gaussian"). B is always zero.
    dropout: dropout on each adapted module's LoRA input in training (the paper's and PEFT's `lora_dropout`),
        stored as the module's `lora_dropout` leaf, which is what the layer applies.
    rslora: scale by alpha/sqrt(r) (Kalajdzievas 2023) instead of alpha/r.
    train_also: patterns of non-LoRA leaves that stay trainable (e.g. the classification head). A pattern
        matches any leaf whose dotted path contains it as a run of whole components: `classifier` matches
        `classifier.out_proj.kernel`.
    bias: `"none"`, `"all"` (every bias trains) or `"lora_only"` (biases of adapted modules train), as in loralib.
    fused: fused kernels split into equal output slices, `{module pattern: slice names}`, e.g.
        `{"c_attn": ("q", "k", "v")}`; target a slice as `c_attn.q` (or by its name alone, `q`). The layer reads
        the layout from the leaves (`lora_slice_q` and the width of `lora_b_q`), so this is its only declaration.
    rank_pattern / alpha_pattern: per-target overrides `{pattern: r}` / `{pattern: alpha}`; the first pattern
        that matches a module path wins.
    exclude: module patterns never adapted (applies to every target, and is what keeps heads out of
        `all-linear`).
    """

    r: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("query", "value")
    dropout: float = 0.0
    init: Literal["kaiming", "gaussian"] = "kaiming"
    rslora: bool = False
    train_also: tuple[str, ...] = ()
    bias: Literal["none", "all", "lora_only"] = "none"
    fused: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    exclude: tuple[str, ...] = ("classifier", "lm_head", "score")

    def __post_init__(self) -> None:
        # Accept lists (Hydra/JSON give lists) but store tuples so the config stays hashable.
        for name in ("targets", "train_also", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "fused", {k: tuple(v) for k, v in dict(self.fused).items()})
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
        _check_rank(self.r, "r")
        for pattern, rank in self.rank_pattern.items():
            _check_rank(rank, f"rank_pattern[{pattern!r}]")
        for pattern, alpha in [("alpha", self.alpha), *self.alpha_pattern.items()]:
            if not alpha > 0:
                raise LoraError(f"LoRA {pattern} must be > 0, got {alpha}; the paper uses alpha = r (or 2r).")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        if self.init not in ("kaiming", "gaussian"):
            raise LoraError(f"LoRA init must be 'kaiming' or 'gaussian', got {self.init!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise LoraError(f"LoRA bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        if not self.targets:
            raise LoraError("LoRA targets is empty; name at least one module, e.g. targets=['query', 'value'].")

    def rank_for(self, module_path: str) -> int:
        return next((r for p, r in self.rank_pattern.items() if matches_module(p, module_path)), self.r)

    def scale_for(self, module_path: str) -> float:
        r = self.rank_for(module_path)
        alpha = next((a for p, a in self.alpha_pattern.items() if matches_module(p, module_path)), self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LoraError(f"Unknown LoraConfig fields {unknown}; valid fields are {sorted(known)}.")
        return cls(**d)


def _check_rank(r: Any, name: str) -> None:
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0:
        raise LoraError(f"LoRA {name} must be a positive integer, got {r!r}; the paper uses r in 1..64.")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------------------------
# Kernels and LoRA leaves
# ---------------------------------------------------------------------------------------------------------------


def _modules_with_kernels(tree: Params, prefix: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(module path, module dict) for every dict that holds a 2-D `kernel` leaf."""
    for name, child in tree.items():
        path = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(child, Mapping):
            kernel = child.get("kernel")
            if kernel is not None and not isinstance(kernel, Mapping) and np.ndim(kernel) == 2:
                yield path, child
            yield from _modules_with_kernels(child, path)


def _lora_suffixes(module: Mapping[str, Any]) -> list[str]:
    """'' for a whole-kernel adapter, '_q' etc. for adapted slices of a fused kernel."""
    return sorted(k[len(LORA_A) :] for k in module if k.startswith(LORA_A))


def is_lora_leaf(path: str) -> bool:
    return path.rsplit(".", 1)[-1].startswith(LORA_PREFIX)


# ---------------------------------------------------------------------------------------------------------------
# Wrapping
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Target:
    module_path: str  # dotted path of the module holding the kernel
    slice_name: str | None  # None: the whole kernel
    slice_index: int
    num_slices: int

    @property
    def name(self) -> str:
        return self.module_path if self.slice_name is None else f"{self.module_path}.{self.slice_name}"

    @property
    def suffix(self) -> str:
        return "" if self.slice_name is None else f"_{self.slice_name}"


def _find_targets(params: Params, config: LoraConfig) -> list[tuple[_Target, Mapping[str, Any]]]:
    found = []
    for module_path, module in _modules_with_kernels(params):
        if any(matches_module(p, module_path) for p in config.exclude):
            continue
        slices = next((s for p, s in config.fused.items() if matches_module(p, module_path)), ())
        whole = _Target(module_path, None, 0, 1)
        if ALL_LINEAR in config.targets or any(matches_module(t, module_path) for t in config.targets):
            found.append((whole, module))
            continue
        for i, s in enumerate(slices):
            part = _Target(module_path, s, i, len(slices))
            if any(matches_module(t, part.name) for t in config.targets):
                found.append((part, module))
    return found


def available_kernels(params: Params, config: LoraConfig | None = None) -> list[str]:
    """Every module path a target could name (fused slices included), for error messages and discovery."""
    fused = config.fused if config is not None else {}
    names = []
    for module_path, _ in _modules_with_kernels(params):
        names.append(module_path)
        slices = next((s for p, s in fused.items() if matches_module(p, module_path)), ())
        names.extend(f"{module_path}.{s}" for s in slices)
    return names


def _summarise(paths: Sequence[str], limit: int = 12) -> str:
    # Collapse layer indices so a 24-layer model lists each kind of kernel once.
    kinds = list(dict.fromkeys(re.sub(r"(?<=[._])\d+(?=\.|$)", "<i>", p) for p in paths))
    more = f", ... ({len(kinds) - limit} more)" if len(kinds) > limit else ""
    return ", ".join(kinds[:limit]) + more


def lora_wrap(params: Params, config: LoraConfig, rng: jax.Array) -> dict[str, Any]:
    """Add `lora_a`, `lora_b`, `lora_scale` beside every targeted kernel; leave every other leaf as it is.

    The init of each adapter depends only on `rng` and its own path, so adding a target does not change the
    others. Untouched subtrees are returned as the same objects.
    """
    if any(is_lora_leaf(p) for p, _ in leaf_paths(params)):
        raise LoraError("These params already carry LoRA leaves; wrap the base params (or `merge` them first).")
    targets = _find_targets(params, config)
    if not targets:
        raise LoraError(
            f"LoRA targets {list(config.targets)} match no kernel; available: "
            f"{_summarise(available_kernels(params, config))}."
        )
    unmatched = [
        t
        for t in config.targets
        if t != ALL_LINEAR and not any(matches_module(t, target.name) for target, _ in targets)
    ]
    if unmatched:
        excluded = [t for t in unmatched if any(matches_module(t, k) for k in available_kernels(params, config))]
        if excluded:
            raise LoraError(
                f"LoRA targets {excluded} only match modules under LoraConfig.exclude {list(config.exclude)}; "
                "pass exclude=() to adapt them (or train them fully with train_also)."
            )
        raise LoraError(
            f"LoRA targets {unmatched} match no kernel; available: {_summarise(available_kernels(params, config))}."
        )

    additions: dict[str, dict[str, jax.Array]] = {}
    for target, module in targets:
        kernel = module["kernel"]
        d_in, d_out = kernel.shape
        if d_out % target.num_slices:
            raise LoraError(
                f"{target.module_path}: width {d_out} does not split into {target.num_slices} equal slices; "
                "fix LoraConfig.fused."
            )
        d_out //= target.num_slices
        r = config.rank_for(target.name)
        if r > min(d_in, d_out):
            raise LoraError(
                f"LoRA rank {r} exceeds min(d_in, d_out) = {min(d_in, d_out)} for {target.name}; "
                f"use r <= {min(d_in, d_out)}."
            )
        key = jax.random.fold_in(rng, zlib.crc32(target.name.encode()))
        dtype = kernel.dtype
        if config.init == "kaiming":
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(key, (d_in, r), jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(key, (d_in, r), jnp.float32) / r
        leaves = additions.setdefault(target.module_path, {})
        leaves[LORA_A + target.suffix] = a.astype(dtype)
        leaves[LORA_B + target.suffix] = jnp.zeros((r, d_out), dtype)
        leaves[LORA_SCALE + target.suffix] = jnp.asarray(config.scale_for(target.name), jnp.float32)
        if target.slice_name is not None:
            leaves[LORA_SLICE + target.suffix] = jnp.asarray(target.slice_index, jnp.int32)
        if config.dropout > 0:  # one rate per module: its slices share the input that dropout acts on
            leaves[LORA_DROPOUT] = jnp.asarray(config.dropout, jnp.float32)
    return _insert(params, additions)


def _insert(tree: Params, additions: Mapping[str, Mapping[str, Any]], prefix: str = "") -> dict[str, Any]:
    """Copy only the dicts on the way to modules that gain leaves; share everything else."""
    out = {}
    for name, child in tree.items():
        path = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(child, Mapping) and any(m == path or m.startswith(path + ".") for m in additions):
            child = _insert(child, additions, path)
            if path in additions:
                child = {**child, **additions[path]}
        out[name] = child
    return out


def lora_params(params: Params) -> dict[str, Any]:
    """Only the LoRA leaves, as a nested dict (the adapter)."""
    return filter_leaves(params, lambda path: is_lora_leaf(path))


def strip_lora(params: Params) -> dict[str, Any]:
    """Params without any LoRA leaves (the base model's structure)."""
    return filter_leaves(params, lambda path: not is_lora_leaf(path))


# ---------------------------------------------------------------------------------------------------------------
# Merging for inference
# ---------------------------------------------------------------------------------------------------------------


def _delta(module: Mapping[str, Any], suffix: str) -> jax.Array:
    a = jnp.asarray(module[LORA_A + suffix], jnp.float32)
    b = jnp.asarray(module[LORA_B + suffix], jnp.float32)
    return jnp.asarray(module[LORA_SCALE + suffix], jnp.float32) * (a @ b)


def _fold(params: Params, adapter: Params, sign: float, dequantize: bool, prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, child in params.items():
        sub = adapter.get(name) if isinstance(adapter, Mapping) else None
        if not isinstance(child, Mapping) or not isinstance(sub, Mapping):
            if not (isinstance(name, str) and name.startswith(LORA_PREFIX)):
                out[name] = child
            continue
        path = f"{prefix}.{name}" if prefix else str(name)
        child = _fold(child, sub, sign, dequantize, path)
        suffixes = _lora_suffixes(sub)
        if suffixes:
            kernel = child["kernel"]
            if is_quantized(kernel) and not dequantize:
                raise LoraError(
                    f"{path}.kernel is quantized ({type(kernel).__name__}): merging would requantize it and "
                    "silently lose accuracy; dequantize first (merge(params, dequantize=True) merges into a "
                    "float copy)."
                )
            kernel = kernel.dequantize() if is_quantized(kernel) else jnp.asarray(kernel)
            w = kernel.astype(jnp.float32)
            for suffix in suffixes:
                delta = _delta(sub, suffix)
                if suffix == "":
                    w = w + sign * delta
                else:
                    width = delta.shape[1]
                    start = jnp.asarray(sub[LORA_SLICE + suffix], jnp.int32) * width
                    part = jax.lax.dynamic_slice_in_dim(w, start, width, axis=1)
                    w = jax.lax.dynamic_update_slice_in_dim(w, part + sign * delta, start, axis=1)
            child = {**child, "kernel": w.astype(kernel.dtype)}
        out[name] = child
    return out


def merge(params: Params, dequantize: bool = False) -> dict[str, Any]:
    """Fold W + scale * A B into each adapted kernel (in float32) and drop the LoRA leaves.

    The result has the base model's exact structure: it runs on the plain model with no extra work and can be
    exported as an ordinary checkpoint. `unmerge(merged, lora_params(params))` takes the adapter back out.
    A quantized adapted kernel is refused unless `dequantize`: then it becomes a float kernel (its logical dtype)
    with the update merged in; kernels without an adapter stay quantized (`quant.dequantize_params` for all).
    """
    if any(is_adapter_leaf(p) for p, _ in leaf_paths(params)):
        raise LoraError(
            "These params carry bottleneck adapters (adapter_h/l/p/d): an adapter is an extra nonlinear layer, not "
            "a weight update, so it cannot be merged; save it as an adapter file (save_adapter) instead."
        )
    if any(is_prefix_leaf(p) for p, _ in leaf_paths(params)):
        raise LoraError(
            "Prefix-tuning leaves are extra input tokens, not a weight update, and cannot be merged; "
            "save them as an adapter (adapters.save_adapter) and load it onto the base model instead."
        )
    return _fold(params, lora_params(params), +1.0, dequantize)


def unmerge(merged: Params, adapter: Params) -> dict[str, Any]:
    """Subtract the adapter's low-rank update from merged kernels and put the LoRA leaves back."""
    return combine(_fold(merged, adapter, -1.0, False), adapter)
