"""Combining LoRA adapters into one, with PEFT's `add_weighted_adapter` semantics, as pure functions.

Inputs are adapter trees (`lora_params(...)`, `bank.adapter(...)`); the output is an adapter tree whose scale is 1
(PEFT gives the new adapter lora_alpha = r). Per adapted kernel, over the adapters that adapt it:

    cat          A = [w_i s_i A_i], B = [B_i] side by side: exactly sum_i w_i s_i A_i B_i, rank sum_i r_i
    linear, ties, dare_linear, dare_ties, magnitude_prune
                 the method applied to the A's and to the B's apart, A with weights sign(w s) sqrt|w s| and B
                 with sqrt|w s| (equal ranks only): cheap, and only an approximation of the weighted sum
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
                 the method applied to the full updates s_i A_i B_i, then truncated to `rank` by an SVD, always
                 in float32 (a bf16 SVD loses the small singular values the truncation ranks by)

`weights` may be traced: every method jits, and vmaps over weights (an interpolation sweep is one program).
The DARE methods draw their keep masks from `key`, per kernel, factor and adapter (`drop_mask`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.bank import Target, nest, targets_of
from lora_jax.lora import LORA_A, LORA_B, LORA_SCALE, LORA_SLICE, LoraError
from lora_jax.tree import Params

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = tuple(f"{m}_svd" for m in FACTOR_METHODS[1:]) + ("svd",)
METHODS = ("cat", *FACTOR_METHODS, *SVD_METHODS)


def combine_adapters(
    adapters: Sequence[Params],
    weights: Any,
    method: str = "svd",
    rank: int | None = None,
    density: float | None = None,
    majority_sign: Literal["total", "frequency"] = "total",
    key: jax.Array | None = None,
    clamp: float | None = None,
) -> dict[str, Any]:
    """One adapter from `adapters` weighted by `weights` (see the module docstring for the methods).

    rank: the svd methods' output rank (default: the largest source rank). density: the fraction of entries
    the pruning methods keep. majority_sign: TIES's sign election, by summed value or by count.
    clamp: the svd methods' quantile clamp of the factors' entries (PEFT's svd_clamp).
    """
    if method not in METHODS:
        raise LoraError(f"Unknown combination method {method!r}; use one of {list(METHODS)}.")
    if len(adapters) == 1:
        method = "linear"  # as PEFT: one adapter can only be reweighted
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != (len(adapters),):
        raise LoraError(f"weights has shape {weights.shape}; give one weight per adapter ({len(adapters)}).")
    kind = method.removesuffix("_svd")
    if kind not in ("linear", "svd", "cat") and density is None:
        raise LoraError(f"Method {method!r} prunes: pass density (the fraction of entries kept, e.g. 0.5).")
    if kind.startswith("dare") and key is None:
        raise LoraError(f"Method {method!r} drops entries at random: pass key=jax.random.key(seed).")
    sources = [targets_of(a) for a in adapters]
    if method in SVD_METHODS:
        total = sum(max(np.shape(v["a"])[1] for v in s.values()) for s in sources)
        rank = rank or max(np.shape(v["a"])[1] for s in sources for v in s.values())
        if rank > total:
            raise LoraError(
                f"svd rank {rank} exceeds the sum of the source adapters' ranks ({total}), the most their weighted "
                f"sum can have; use rank <= {total}."
            )
    out: dict[str, Any] = {}
    for target in dict.fromkeys(t for s in sources for t in s):
        found = [(i, s[target]) for i, s in enumerate(sources) if target in s]
        w = weights[jnp.array([i for i, _ in found])]
        scales = [jnp.asarray(leaves["scale"], jnp.float32).reshape(()) for _, leaves in found]
        factors = [(leaves["a"], leaves["b"]) for _, leaves in found]
        if method == "cat":
            a = jnp.concatenate([_scaled(a, wi * si) for (a, _), wi, si in zip(factors, w, scales, strict=True)], 1)
            b = jnp.concatenate([f[1] for f in factors], 0)
        elif method in SVD_METHODS:
            a, b = _svd_combine(target, factors, scales, w, kind, rank, density, majority_sign, key, clamp)
        else:
            a, b = _factor_combine(target, factors, w * jnp.stack(scales), kind, density, majority_sign, key)
        module, suffix = target
        out[f"{module}.{LORA_A}{suffix}"], out[f"{module}.{LORA_B}{suffix}"] = a, b
        out[f"{module}.{LORA_SCALE}{suffix}"] = jnp.ones((), jnp.float32)
        if "slice" in found[0][1]:
            out[f"{module}.{LORA_SLICE}{suffix}"] = found[0][1]["slice"]
    return nest(out)


def _scaled(x: jax.Array, by: jax.Array) -> jax.Array:
    return (jnp.asarray(x, jnp.float32) * by).astype(jnp.asarray(x).dtype)


def _name(target: Target) -> str:
    return target[0] + target[1]


def _factor_combine(target, factors, w, kind, density, majority_sign, key):
    ranks = {f[0].shape[1] for f in factors}
    if len(ranks) != 1:
        raise LoraError(
            f"{kind} combines A's and B's entry by entry and needs equal ranks, {_name(target)} has ranks "
            f"{sorted(ranks)}; use method 'cat' or 'svd'."
        )
    sign = jnp.where(w >= 0, 1.0, -1.0)
    root = jnp.sqrt(jnp.abs(w))
    a = _reduce(kind, [f[0] for f in factors], sign * root, density, majority_sign, key, f"{_name(target)}:A")
    b = _reduce(kind, [f[1] for f in factors], root, density, majority_sign, key, f"{_name(target)}:B")
    return a.astype(factors[0][0].dtype), b.astype(factors[0][1].dtype)


def _svd_combine(target, factors, scales, w, kind, rank, density, majority_sign, key, clamp):
    d_in, d_out = factors[0][0].shape[0], factors[0][1].shape[1]
    if rank > min(d_in, d_out):
        raise LoraError(f"svd rank {rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} at {_name(target)}.")
    # The scales live in the updates (PEFT's get_delta_weight): TIES elects signs on s A B, not on A B.
    deltas = [
        s * (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32))
        for (a, b), s in zip(factors, scales, strict=True)
    ]
    delta = _reduce("linear" if kind == "svd" else kind, deltas, w, density, majority_sign, key, _name(target))
    u, s, vh = jnp.linalg.svd(delta.T, full_matrices=False)
    u, vh = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:
        high = jnp.quantile(jnp.concatenate([u.ravel(), vh.ravel()]), clamp)
        u, vh = jnp.clip(u, -high, high), jnp.clip(vh, -high, high)
    return vh.T.astype(factors[0][0].dtype), u.T.astype(factors[0][1].dtype)


def drop_mask(key: jax.Array, name: str, index: int, density: float, shape: tuple[int, ...]) -> jax.Array:
    """The keep mask (float 0/1) DARE draws for source `index`'s tensor `name` (e.g. 'layer.0.query:A')."""
    key = jax.random.fold_in(jax.random.fold_in(key, zlib.crc32(name.encode())), index)
    return jax.random.bernoulli(key, density, shape).astype(jnp.float32)


def _magnitude_prune(t: jax.Array, density: float) -> jax.Array:
    k = int(density * t.size)
    flat = jnp.abs(t).ravel()
    keep = jnp.zeros(t.size, t.dtype).at[jax.lax.top_k(flat, k)[1]].set(1.0) if k else jnp.zeros(t.size, t.dtype)
    return t * keep.reshape(t.shape)


def _reduce(kind, tensors, w, density, majority_sign, key, name):
    """PEFT's merge_utils on one stacked set of tensors: prune (per tensor), then sum or TIES's disjoint merge."""
    tensors = [jnp.asarray(t, jnp.float32) for t in tensors]
    if kind in ("ties", "magnitude_prune") and density < 1:
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties") and density < 1:
        tensors = [t * drop_mask(key, name, i, density, t.shape) / density for i, t in enumerate(tensors)]
    stacked = jnp.stack(tensors)
    weighted = stacked * w.reshape((-1,) + (1,) * (stacked.ndim - 1))
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(0)
    if majority_sign not in ("total", "frequency"):
        raise LoraError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}.")
    sign = jnp.sign(stacked)
    votes = stacked.sum(0) if majority_sign == "total" else sign.sum(0)
    agree = sign == jnp.where(votes >= 0, 1.0, -1.0)
    return (weighted * agree).sum(0) / jnp.maximum(agree.sum(0), 1.0)
