"""Bottleneck adapters and FT-Top2, the LoRA paper's Section 5.1 baselines, as transforms of a parameter pytree.

An adapter is a small residual MLP on a sub-layer's output y: `y + up(relu(down(y)))` (Houlsby et al. 2019), with
a LayerNorm of its own before `down` in AdapterL (Lin et al. 2020). Its leaves sit beside the kernel of the Dense
whose output it reads, the attention and MLP output projections each family names in `FamilySpec.adapter_sites`,
and `lora_jax.layers.Dense` applies it when it sees them, as it applies LoRA. `adapter_up` starts at zero, so a
wrapped model computes exactly the pretrained function. Unlike LoRA's low-rank update an adapter is an extra
nonlinear layer: it cannot be merged into the kernel, and it costs inference latency (the paper's Table 1).

The four designs (`DESIGNS`), as the paper describes them and as its printed counts confirm:
    adapter_h  after the attention block and after the MLP block of every layer; the model's LayerNorms train too
    adapter_l  after the MLP block only, with its own trainable LayerNorm
    adapter_p  after the MLP block only, no LayerNorm of its own (Pfeiffer et al. 2021; "very similar" to L)
    adapter_d  adapter_p without adapters in the lowest `drop_first` layers of each stack (AdapterDrop, Rücklé
               et al. 2020, whose headline setting drops the first five)
`ft_top2` (Li & Liang 2021's FT-Top2) adds no leaves: `methods.trainable_mask` trains the last two layers.

A layer is the first numbered component of a param path (`encoder.layer.3...`, `transformer.h.3...`,
`encoder.block.3.layer.0...`); the path before it names the stack, so an encoder-decoder has two.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.tree import Params, combine, filter_leaves, leaf_paths

ADAPTER_PREFIX = "adapter_"
DOWN, DOWN_BIAS, UP, UP_BIAS = "adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias"
LN_SCALE, LN_BIAS = "adapter_ln_scale", "adapter_ln_bias"
LN_EPSILON = 1e-5
FT_TOP2 = "ft_top2"


class AdapterError(ValueError):
    """A baseline that does not apply to these params or this config; the message says what would work."""


@dataclasses.dataclass(frozen=True)
class Design:
    sites: tuple[str, ...]  # which of the family's adapter sites ("attn", "mlp") carry an adapter
    layer_norm: bool  # a trainable LayerNorm of the adapter's own before the down-projection (AdapterL)
    train_norms: bool  # the model's own LayerNorms train as well (Houlsby)
    drops_lower: bool  # no adapters in the lowest `AdapterConfig.drop_first` layers (AdapterDrop)


DESIGNS = {
    "adapter_h": Design(("attn", "mlp"), layer_norm=False, train_norms=True, drops_lower=False),
    "adapter_l": Design(("mlp",), layer_norm=True, train_norms=False, drops_lower=False),
    "adapter_p": Design(("mlp",), layer_norm=False, train_norms=False, drops_lower=False),
    "adapter_d": Design(("mlp",), layer_norm=False, train_norms=False, drops_lower=True),
}
ADAPTER_METHODS = tuple(DESIGNS)


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """r: the bottleneck width. sites: {"attn": module pattern, "mlp": module pattern} (lora_jax.lora's pattern
    rules), the family's `adapter_sites` (`hub.adapter_config` fills them in). drop_first: adapter_d only, how many
    of the lowest layers of each stack get no adapter. init_std: std of the down-projection's normal init (Houlsby's
    near-identity init); the up-projection is zero."""

    r: int = 8
    sites: Mapping[str, str] = dataclasses.field(default_factory=dict)
    drop_first: int = 5
    init_std: float = 1e-2

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", dict(self.sites))
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r <= 0:
            raise AdapterError(f"adapter r must be a positive integer, got {self.r!r}; the paper uses 8..64.")
        if self.drop_first < 0:
            raise AdapterError(f"adapter drop_first must be >= 0, got {self.drop_first}.")
        if not self.init_std >= 0:
            raise AdapterError(f"adapter init_std must be >= 0, got {self.init_std}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AdapterError(f"Unknown AdapterConfig fields {unknown}; valid fields are {sorted(known)}.")
        return cls(**d)


def is_adapter_leaf(path: str) -> bool:
    return path.rsplit(".", 1)[-1].startswith(ADAPTER_PREFIX)


def adapter_params(params: Params) -> dict[str, Any]:
    """Only the adapter leaves, as a nested dict."""
    return filter_leaves(params, is_adapter_leaf)


def strip_adapters(params: Params) -> dict[str, Any]:
    """Params without adapter leaves: the base model's structure."""
    return filter_leaves(params, lambda path: not is_adapter_leaf(path))


# ---------------------------------------------------------------------------------------------------------------
# Layers and norms, read from paths
# ---------------------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def layer_of(path: str) -> tuple[str, int] | None:
    """(stack, index) of the layer a path lies in, or None outside the numbered layers."""
    m = _LAYER.search(path)
    return (path[: m.start(1)], int(m.group(1))) if m else None


def stack_depths(params: Params) -> dict[str, int]:
    """{stack: number of layers} ("bert.encoder.layer." -> 12)."""
    depths: dict[str, int] = {}
    for path, _ in leaf_paths(params):
        layer = layer_of(path)
        if layer is not None:
            depths[layer[0]] = max(depths.get(layer[0], 0), layer[1] + 1)
    return depths


def top_layers(params: Params, n: int = 2) -> set[tuple[str, int]]:
    """The last `n` layers of every stack; refused in one line when a stack has fewer (or there are none)."""
    depths = stack_depths(params)
    if not depths:
        raise AdapterError(
            f"{FT_TOP2} trains the last {n} numbered layers, but these params have none; use method=full or lora."
        )
    shallow = {stack: depth for stack, depth in depths.items() if depth < n}
    if shallow:
        stack, depth = next(iter(shallow.items()))
        raise AdapterError(
            f"{FT_TOP2} trains the last {n} layers, but {stack.rstrip('.')} has {depth}; use method=full (or lora) "
            "on a model this shallow."
        )
    return {(stack, i) for stack, depth in depths.items() for i in range(depth - n, depth)}


def norm_modules(params: Params) -> set[str]:
    """Module paths of the normalisation layers: a `scale` leaf and neither a kernel nor an embedding beside it."""
    leaves: dict[str, set[str]] = {}
    for path, _ in leaf_paths(params):
        module, _, name = path.rpartition(".")
        leaves.setdefault(module, set()).add(name)
    return {m for m, names in leaves.items() if "scale" in names and not names & {"kernel", "embedding"}}


# ---------------------------------------------------------------------------------------------------------------
# Wrapping
# ---------------------------------------------------------------------------------------------------------------


def _site_modules(params: Params, method: str, config: AdapterConfig) -> list[tuple[str, Any]]:
    """(module path, kernel) of every Dense the design puts an adapter after."""
    design = DESIGNS[method]
    missing = [s for s in design.sites if s not in config.sites]
    if missing:
        raise AdapterError(
            f"{method} needs adapter sites {list(design.sites)}, the config has {sorted(config.sites)}; "
            "build it with hub.adapter_config(model_type) (or set adapter.sites)."
        )
    patterns = [config.sites[s] for s in design.sites]
    found = []
    for path, kernel in leaf_paths(params):
        if not path.endswith(".kernel") or np.ndim(kernel) != 2:
            continue
        module = path.removesuffix(".kernel")
        if any(re.search(rf"(?:^|\.)(?:{p})$", module) for p in patterns):
            found.append((module, kernel))
    if not found:
        raise AdapterError(f"{method}: adapter sites {patterns} match no kernel in these params; wrong family?")
    if design.drops_lower:
        depths = stack_depths(params)
        if any(config.drop_first >= depth for depth in depths.values()):
            raise AdapterError(
                f"adapter_d with drop_first={config.drop_first} leaves no layer of {min(depths.values())} with an "
                f"adapter; use adapter.drop_first <= {min(depths.values()) - 1} (or adapter_p: every layer)."
            )
        found = [(m, k) for m, k in found if (layer_of(m) or ("", config.drop_first))[1] >= config.drop_first]
    return found


def adapter_wrap(params: Params, method: str, config: AdapterConfig, rng: jax.Array) -> dict[str, Any]:
    """Add the adapter leaves of `method` after every site; leave every other leaf as it is.

    Each adapter's init depends only on `rng` and its module path. `adapter_up` (and both biases) start at zero,
    so the wrapped model computes the base model's function (to the rounding of a differently compiled program).
    """
    if method not in DESIGNS:
        raise AdapterError(f"adapter method must be one of {list(DESIGNS)}, got {method!r}.")
    if any(is_adapter_leaf(p) for p, _ in leaf_paths(params)):
        raise AdapterError("These params already carry adapter leaves; wrap the base params (strip_adapters).")
    additions: dict[str, Any] = {}
    for module, kernel in _site_modules(params, method, config):
        d = int(np.shape(kernel)[1])
        if config.r > d:
            raise AdapterError(f"adapter r={config.r} exceeds d_model={d} at {module}; use adapter.r <= {d}.")
        dtype = jnp.dtype(getattr(kernel, "dtype", jnp.float32))
        key = jax.random.fold_in(rng, zlib.crc32(module.encode()))
        leaves = {
            DOWN: (config.init_std * jax.random.normal(key, (d, config.r), jnp.float32)).astype(dtype),
            DOWN_BIAS: jnp.zeros((config.r,), dtype),
            UP: jnp.zeros((config.r, d), dtype),
            UP_BIAS: jnp.zeros((d,), dtype),
        }
        if DESIGNS[method].layer_norm:
            leaves.update({LN_SCALE: jnp.ones((d,), dtype), LN_BIAS: jnp.zeros((d,), dtype)})
        node = additions
        for name in module.split("."):
            node = node.setdefault(name, {})
        node.update(leaves)
    return combine(params, additions)


# ---------------------------------------------------------------------------------------------------------------
# Counting (the paper's Section 5.1 formulas)
# ---------------------------------------------------------------------------------------------------------------


def paper_adapter_count(num_adapters: int, d_model: int, r: int, num_layer_norms: int = 0) -> int:
    """|Θ| = L̂_Adpt·(2·d_model·r + r + d_model) + 2·L̂_LN·d_model, the paper's count for every adapter design."""
    return num_adapters * (2 * d_model * r + r + d_model) + 2 * num_layer_norms * d_model


def paper_prefix_count(method: str, d_model: int, num_layers: int, l_p: int, l_i: int) -> int:
    """PreEmbed |Θ| = d_model·(l_p + l_i); PreLayer |Θ| = L·d_model·(l_p + l_i) (the paper's Section 5.1)."""
    per_layer = d_model * (l_p + l_i)
    if method == "prefix_embed":
        return per_layer
    if method == "prefix_layer":
        return num_layers * per_layer
    raise AdapterError(f"paper_prefix_count knows prefix_embed and prefix_layer, got {method!r}.")


def adapter_layout(params: Params) -> tuple[int, int]:
    """(adapters, adapter LayerNorms) in wrapped params: the L̂_Adpt and L̂_LN of the paper's formula."""
    names = [p.rsplit(".", 1)[-1] for p, _ in leaf_paths(params)]
    return names.count(DOWN), names.count(LN_SCALE)
