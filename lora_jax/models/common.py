"""What every model family shares: activations, layer factories, the numbered layer stack, masked softmax, and
the bookkeeping of config.json and state-dict conversion.

Each family file (bert.py, gpt2.py, ...) keeps what makes its architecture itself; anything here is the same
logic in all of them, so a fix lands once.
"""

from __future__ import annotations

import dataclasses
import importlib
import zlib
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.layers import Dense, LayerNorm
from lora_jax.lora import is_lora_leaf
from lora_jax.tree import leaf_paths

# transformers' ACT2FN names -> functions. HF "gelu" is the exact erf form; the "new"/"tanh"/"fast" names are the
# tanh approximation. Each is checkpointed on its own: the backward pass keeps its input and recomputes the rest,
# where plain autodiff of the exact GELU keeps four (tokens x intermediate) tensors (RoBERTa-base LoRA step 8x128:
# 288 MB of XLA temporaries fewer, 1244 -> 956 MB).
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}
ACTIVATIONS = {name: jax.checkpoint(fn) for name, fn in _ACTIVATIONS.items()}
NOT_HF = ("dtype", "param_dtype", "remat")  # Config fields of ours, not of config.json


# ------------------------------------------------------------------------------------------------------------
# Config bookkeeping
# ------------------------------------------------------------------------------------------------------------


def hf_fields(config_class: type, skip: tuple[str, ...] = ()) -> list[str]:
    """The Config fields that config.json shares (everything but our dtype/LoRA/remat switches and `skip`)."""
    return [f.name for f in dataclasses.fields(config_class) if f.name not in NOT_HF + skip]


def num_labels_from_hf(hf: Mapping[str, Any], num_labels: int | None) -> int:
    """The caller's num_labels, else config.json's, else its id2label's length, else 2 (transformers' default)."""
    if num_labels is None:
        num_labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
    return num_labels


def label_maps(num_labels: int) -> dict[str, dict]:
    """The id2label/label2id pair transformers writes for a classifier with default label names."""
    return {
        "id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(num_labels)},
    }


def check_task(task: str, tasks: tuple[str, ...], family: str) -> None:
    if task not in tasks:
        raise ValueError(f"{family} has no task {task!r}; it supports tasks {list(tasks)}.")


# ------------------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------------------


def dense(config: Any, features: int, name: str, std: float, use_bias: bool = True, **kwargs: Any) -> Dense:
    """A LoRA-aware Dense in the config's dtypes, its kernel drawn from N(0, std) as transformers inits it."""
    return Dense(
        features,
        use_bias=use_bias,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=nn.initializers.normal(std),
        name=name,
        **kwargs,
    )


def layer_norm(config: Any, epsilon: float, name: str) -> LayerNorm:
    """LayerNorm in the config's dtypes (two-pass variance, as torch; lean backward pass: layers.LayerNorm)."""
    return LayerNorm(epsilon, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), name=name)


# What a layer keeps for the backward pass under each `remat` setting (False: everything; True: only its input).
REMAT_POLICIES = {
    # Keep the outputs of the weight matmuls; recompute attention's batched matmuls and the elementwise work.
    # Before LayerNorm, activations and softmax kept only their inputs this cut a RoBERTa-base 8x128 LoRA step's
    # XLA temporaries 1244 -> 932 MB; with them (885 MB) it saves nothing more on BERT-style models.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(block: type[nn.Module], remat: bool | str, deterministic_argnum: int) -> type[nn.Module]:
    """`block`, recomputed in the backward pass when `remat`: True recomputes the whole block (least memory,
    ~30% more time), "dots" only its elementwise work. Flax counts `self` as argument 0, and `deterministic`
    must be static because it picks the dropout branch."""
    if not remat or remat == "none":
        return block
    if remat is not True and remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be true, false or one of {sorted(REMAT_POLICIES)}, got {remat!r}.")
    policy = None if remat is True else REMAT_POLICIES[remat]
    return nn.remat(block, static_argnums=(deterministic_argnum,), policy=policy)


class Layers(nn.Module):
    """`num_layers` blocks `block(config)` in sequence, named "0", "1", ... so paths read `layer.<i>`, as in HF.

    Called as (x, *args, deterministic); each block maps (x, *args, deterministic) -> x.
    """

    block: Callable[..., nn.Module]
    config: Any
    num_layers: int

    @nn.compact
    def __call__(self, x, *args):
        block = maybe_remat(self.block, self.config.remat, len(args) + 1)
        for i in range(self.num_layers):
            x = block(self.config, name=str(i))(x, *args)
        return x


@partial(jax.checkpoint, static_argnums=(2,))
def masked_softmax(scores: jax.Array, mask: jax.Array, dtype: Any) -> jax.Array:
    """softmax over keys in float32 (bf16 logits lose the small differences), cast to `dtype`.

    Masked scores become float32's minimum, not -inf: a row with no visible key (a padded query) gets a uniform
    distribution instead of NaN, as in transformers; its output is never used. Checkpointed: the backward pass keeps
    the scores and recomputes the softmax, instead of keeping the masked scores and their exponentials as well.
    """
    scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def attention_scores(q: jax.Array, k: jax.Array, preferred_element_type: Any = jnp.float32) -> jax.Array:
    """Per-head q.k for (batch, length, heads, head_dim) inputs -> (batch, heads, q_len, k_len).

    Computed on head-major operands: XLA:CPU's batched matmul runs 2-3x faster on (b, h, t, d) than on (b, t, h, d)
    (RoBERTa-base 8x128, one layer's attention forward + backward 14.5 -> 11 ms)."""
    return jnp.einsum(
        "bhqd,bhkd->bhqk", q.swapaxes(1, 2), k.swapaxes(1, 2), preferred_element_type=preferred_element_type
    )


def attend(probs: jax.Array, v: jax.Array) -> jax.Array:
    """Attention weights (batch, heads, q_len, k_len) applied to values (batch, k_len, heads, head_dim) ->
    (batch, q_len, heads, head_dim), head-major inside as `attention_scores`."""
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v.swapaxes(1, 2)).swapaxes(1, 2)


# ------------------------------------------------------------------------------------------------------------
# KV cache for one-token-at-a-time decoding: a fixed size, so every decoding step has the same shapes
# ------------------------------------------------------------------------------------------------------------


def family_init_cache(module: nn.Module, batch: int, max_length: int) -> list:
    """An empty cache from the `init_cache` of the family file that defines `module` (t5.py, gpt2.py, ...)."""
    return importlib.import_module(type(module).__module__).init_cache(module.config, batch, max_length)


def empty_cache(layers: int, batch: int, max_length: int, heads: int, head_dim: int, dtype: Any) -> list:
    """One {"k", "v"} pair of (batch, max_length, heads, head_dim) zeros per layer, in the compute dtype."""
    zeros = jnp.zeros((batch, max_length, heads, head_dim), jnp.dtype(dtype))
    return [{"k": zeros, "v": zeros} for _ in range(layers)]


def write_cache(kv: dict, k: jax.Array, v: jax.Array, index: jax.Array | int) -> dict:
    """`kv` with this call's keys/values written at slots index..; attention then reads the whole cache."""
    k = jax.lax.dynamic_update_slice_in_dim(kv["k"], k.astype(kv["k"].dtype), index, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(kv["v"], v.astype(kv["v"].dtype), index, axis=1)
    return {**kv, "k": k, "v": v}


def causal_cache_mask(
    shape: tuple[int, int], key_mask: jax.Array | None, cache: list | None, index: jax.Array | int
) -> jax.Array:
    """(batch, 1, queries, keys) mask for `shape` = (batch, queries) tokens written at slots index..

    Causal over absolute slots: the query at slot index + i sees slots <= its own, and only those `key_mask`
    (batch, keys) allows. With a cache, keys are all its slots and `key_mask` must cover them.
    """
    batch, length = shape
    keys = length if cache is None else cache[0]["k"].shape[1]
    key_mask = jnp.ones((batch, keys), bool) if key_mask is None else key_mask.astype(bool)
    if key_mask.shape != (batch, keys):
        raise ValueError(
            f"attention_mask has shape {key_mask.shape}, expected {(batch, keys)}; with a cache it must "
            "cover the whole cache (batch, max_length)."
        )
    causal = jnp.arange(keys)[None, :] <= (index + jnp.arange(length))[:, None]
    return causal[None, None, :, :] & key_mask[:, None, None, :]


# ------------------------------------------------------------------------------------------------------------
# Checkpoint conversion
# ------------------------------------------------------------------------------------------------------------

_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def hf_key(path: str) -> str:
    """Flax param path -> HF state-dict key: kernel, embedding and LayerNorm scale are all `weight`."""
    module, leaf = path.rsplit(".", 1)
    return f"{module}.{_TO_HF[leaf]}"


def swap_layout(path: str, array: np.ndarray) -> np.ndarray:
    """Flax <-> torch layout (its own inverse): nn.Linear is (out, in), Conv1d (out, in / groups, width)."""
    if path.endswith(".kernel"):
        return array.T if array.ndim == 2 else array.transpose(2, 1, 0)
    return array


def load_weights(
    state: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    heads: tuple[str, ...],
    std: float,
    dtype: Any,
    seed: int,
    family: str,
) -> tuple[dict[str, jax.Array], list[str]]:
    """{param path: array} from an HF state dict whose keys already carry the model's prefix, and the new paths.

    A head (a top-level module in `heads`) that the checkpoint lacks or shapes differently (another label count)
    is initialised fresh and listed; a missing backbone weight is a KeyError, a misshapen one a ValueError; keys
    the model has no use for (pretraining heads, buffers) are ignored.
    """
    flat, new = {}, []
    for path, shape in shapes.items():
        key = hf_key(path)
        weight = swap_layout(path, np.asarray(state[key])) if key in state else None
        if weight is not None and weight.shape == shape:
            flat[path] = jnp.asarray(weight, jnp.dtype(dtype))
        elif path.split(".", 1)[0] in heads:
            flat[path] = fresh(path, shape, std, dtype, seed)
            new.append(path)
        elif weight is None:
            raise KeyError(f"checkpoint has no weight {key!r} (for {path}); is it a {family} checkpoint?")
        else:
            raise ValueError(f"checkpoint weight {key!r} has shape {weight.shape}; the config expects {shape}")
    return flat, new


def abstract_params(module: nn.Module, *inputs: jax.Array) -> dict[str, jax.ShapeDtypeStruct]:
    """{dotted param path: shape and dtype} of `module` initialised on `inputs`, without allocating it."""
    tree = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
    return dict(leaf_paths(tree))


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b.c": leaf} -> {"a": {"b": {"c": leaf}}}."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def fresh(path: str, shape: tuple[int, ...], std: float, dtype: Any, seed: int) -> jax.Array:
    """transformers' _init_weights for what a checkpoint lacks: N(0, std) weights, zero biases, unit scales.

    The key folds in the path, so a head's init does not depend on which other params are new.
    """
    dtype = jnp.dtype(dtype)
    leaf = path.rsplit(".", 1)[-1]
    if leaf == "bias":
        return jnp.zeros(shape, dtype)
    if leaf == "scale":
        return jnp.ones(shape, dtype)
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()))
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def check_merged(params: Mapping[str, Any]) -> None:
    """Exports hold plain weights only: LoRA factors must be merged (or saved as an adapter) first."""
    for path, _ in leaf_paths(params):
        if is_lora_leaf(path):
            raise ValueError(f"{path} is a LoRA leaf; `lora_jax.lora.merge` the params before exporting.")
