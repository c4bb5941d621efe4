"""How much two LoRA adapters' A matrices share: the paper's normalised subspace similarity (Sec. 7.2).

    phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)        in [0, 1]

U1, U2 are A1's and A2's singular vectors in the INPUT space (d_in), sorted by singular value. phi = 1 when the
top-i directions of one lie inside the top-j directions of the other (or vice versa), 0 when they are orthogonal.

Orientation. The paper writes A as r x d_in (delta W = B A acting on column vectors) and takes the RIGHT-singular
vectors of A. lora_jax stores A as `lora_a` with shape d_in x r (y = x W + scale * x A B), i.e. the paper's A
transposed, so the same directions are the LEFT-singular vectors of `lora_a`: the columns of U in
`U, S, Vt = svd(lora_a)`. Everything here takes `lora_a` as lora_jax stores it.

Invariances. phi depends on A only through A A^T (the directions and their ordering), so it is unchanged by
A -> c A Q for any scalar c != 0 and orthogonal r x r Q (sign flips and permutations of A's columns included).
An arbitrary invertible M (e.g. rescaling A's columns) keeps the span, so the full-rank row phi(r1, j) (and
column phi(i, r2)) is unchanged, but it re-weights directions and hence changes the ordering behind phi(i < r1, j).

Also here: grouping an adapter's flat {dotted path: array} into (module kind, layer) so that analyses can
iterate "every query adapter, layer by layer" for any model family.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from lora_jax.lora import LORA_A, LORA_B, LORA_SCALE, LORA_SLICE


def input_directions(lora_a: Any) -> np.ndarray:
    """Orthonormal basis (d_in x r) of A's input-space directions, strongest first: U of svd(lora_a).

    These are the paper's right-singular vectors of its (r x d_in) A.
    """
    a = np.asarray(lora_a, np.float64)
    if a.ndim != 2:
        raise ValueError(f"lora_a must be 2-D (d_in x r), got shape {a.shape}.")
    u, _, _ = np.linalg.svd(a, full_matrices=False)  # singular values come sorted, largest first
    return u


def similarity_from_directions(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """phi[i-1, j-1] for orthonormal bases u1 (d x r1), u2 (d x r2) whose columns are sorted by importance."""
    if u1.shape[0] != u2.shape[0]:
        raise ValueError(f"Subspaces live in different spaces (d_in {u1.shape[0]} vs {u2.shape[0]}); compare "
                         "adapters of the same weight.")  # fmt: skip
    # ||U1[:, :i]^T U2[:, :j]||_F^2 is a 2-D prefix sum of the squared overlaps: all (i, j) in O(r1 r2).
    captured = np.cumsum(np.cumsum((u1.T @ u2) ** 2, axis=0), axis=1)
    i = np.arange(1, u1.shape[1] + 1)[:, None]
    j = np.arange(1, u2.shape[1] + 1)[None, :]
    return captured / np.minimum(i, j)


def grassmann_similarity(a1: Any, a2: Any) -> np.ndarray:
    """phi(A1, A2, i, j) for 1 <= i <= r1, 1 <= j <= r2 as an (r1, r2) array (entry [i-1, j-1]).

    a1, a2: `lora_a` matrices (d_in x r1, d_in x r2) of the same weight, e.g. from runs with r = 8 and r = 64.
    """
    return similarity_from_directions(input_directions(a1), input_directions(a2))


def expected_random_similarity(d_in: int, r1: int, r2: int) -> np.ndarray:
    """E[phi(i, j)] = max(i, j) / d_in for two independent random subspaces.

    A random unit vector has expected squared overlap k / d with a fixed k-dim subspace, so
    E||U1_i^T U2_j||_F^2 = i j / d and dividing by min(i, j) leaves max(i, j) / d.
    """
    i = np.arange(1, r1 + 1)[:, None]
    j = np.arange(1, r2 + 1)[None, :]
    return np.maximum(i, j) / d_in


def random_gaussian_control(d_in: int, r1: int, r2: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """phi between two independent Gaussian d_in x r1 and d_in x r2 matrices: the paper's Figure 4 (right)."""
    rng = np.random.default_rng(rng)
    return grassmann_similarity(rng.standard_normal((d_in, r1)), rng.standard_normal((d_in, r2)))


# ---------------------------------------------------------------------------------------------------------------
# Adapters as (kind, layer) -> factors
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """One adapted kernel (or one slice of a fused kernel): delta W = scale * a @ b in lora_jax orientation."""

    path: str  # module path, no leading "params."; a fused slice is named like a child: "...c_attn.q"
    kind: str  # the path from the layer index on, e.g. "attention.self.query" (the path itself if no index)
    layer: int | None  # first all-digit component of the path, e.g. 3 in "bert.encoder.layer.3.attention..."
    a: np.ndarray  # d_in x r
    b: np.ndarray  # r x d_out
    scale: float
    slice_index: int | None = None  # position of the slice inside a fused kernel

    @property
    def module_path(self) -> str:
        """The module holding the kernel (a fused slice's parent)."""
        return self.path.rsplit(".", 1)[0] if self.slice_index is not None else self.path

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def delta(self) -> np.ndarray:
        return self.scale * (self.a.astype(np.float64) @ self.b.astype(np.float64))


_LEAF = re.compile(rf"^(?P<module>.+)\.(?P<name>{LORA_A}|{LORA_B}|{LORA_SCALE}|{LORA_SLICE})(?P<suffix>_\w+)?$")
_LAYER = re.compile(r"(?:^|\.)(\d+)\.(.+)$")


def split_layer(path: str) -> tuple[str, int | None]:
    """(kind, layer) from a module path: the first all-digit component is the layer index."""
    match = _LAYER.search(path)
    return (match.group(2), int(match.group(1))) if match else (path, None)


def lora_factors(tensors: Mapping[str, Any], default_scale: float | None = None) -> list[LoraFactors]:
    """Every adapted kernel in a flat {dotted path: array} adapter (as in adapter.safetensors), in path order.

    Paths may carry a leading "params." (a tree saved with Flax's outer dict) or not. Non-LoRA leaves
    (a trained head) are ignored. default_scale: used if the adapter stores no `lora_scale` (alpha / r).
    """
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for path, value in tensors.items():
        match = _LEAF.match(path.removeprefix("params."))
        if match:
            groups.setdefault((match["module"], match["suffix"] or ""), {})[match["name"]] = value
    factors = []
    for (module, suffix), leaves in sorted(groups.items()):
        if LORA_A not in leaves or LORA_B not in leaves:
            raise ValueError(f"{module}: adapter has {sorted(leaves)} but needs both lora_a and lora_b.")
        if LORA_SCALE in leaves:
            scale = float(np.asarray(leaves[LORA_SCALE]).reshape(()))
        elif default_scale is not None:
            scale = float(default_scale)
        else:
            raise ValueError(f"{module}: adapter stores no lora_scale; pass default_scale=alpha/r.")
        path = f"{module}.{suffix[1:]}" if suffix else module
        kind, layer = split_layer(path)
        slice_index = int(np.asarray(leaves[LORA_SLICE]).reshape(())) if LORA_SLICE in leaves else None
        a, b = np.asarray(leaves[LORA_A]), np.asarray(leaves[LORA_B])
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"{path}: lora_a {a.shape} and lora_b {b.shape} are not d_in x r and r x d_out.")
        factors.append(LoraFactors(path, kind, layer, a, b, scale, slice_index))
    return factors


def by_kind(factors: Iterable[LoraFactors]) -> dict[str, dict[int | None, LoraFactors]]:
    """{kind: {layer: factors}}, layers in increasing order."""
    out: dict[str, dict[int | None, LoraFactors]] = {}
    for f in sorted(factors, key=lambda f: (f.kind, -1 if f.layer is None else f.layer)):
        out.setdefault(f.kind, {})[f.layer] = f
    return out


def adapter_similarity(
    factors1: Iterable[LoraFactors], factors2: Iterable[LoraFactors]
) -> dict[str, dict[int | None, np.ndarray]]:
    """{kind: {layer: phi(A1, A2)}} over the modules both adapters adapt (matched by path)."""
    second = {f.path: f for f in factors2}
    out: dict[str, dict[int | None, np.ndarray]] = {}
    for f in factors1:
        if f.path in second:
            out.setdefault(f.kind, {})[f.layer] = grassmann_similarity(f.a, second[f.path].a)
    if not out:
        raise ValueError("The two adapters share no adapted module; compare runs of the same model and targets.")
    return {kind: dict(sorted(layers.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))
            for kind, layers in sorted(out.items())}  # fmt: skip


def mean_over_layers(per_layer: Mapping[Any, np.ndarray]) -> np.ndarray:
    """Average phi over layers (all must share a shape)."""
    shapes = {np.shape(v) for v in per_layer.values()}
    if len(shapes) != 1:
        raise ValueError(f"Layers have different ranks {sorted(shapes)}; average layers of one shape only.")
    return np.mean(np.stack(list(per_layer.values())), axis=0)
