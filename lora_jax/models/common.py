"""What every model family's architecture shares: activations, layer factories, the numbered layer stacks (plain
and KV-cached), masked softmax, attention with any number of key/value heads, rotary positions and the KV cache.
(Checkpoint and config.json conversion is lora_jax.models.spec.)

Each family file (bert.py, gpt2.py, ...) keeps what makes its architecture itself; anything here is the same
logic in all of them, so a fix lands once.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.layers import Dense, LayerNorm, RMSNorm
from lora_jax.prefix import layer_input, max_positions

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


def rms_norm(config: Any, epsilon: float, name: str) -> RMSNorm:
    """RMSNorm in the config's dtypes (float32 statistics; lean backward pass: layers.RMSNorm)."""
    return RMSNorm(epsilon, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), name=name)


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

    Called as (x, *args, deterministic, special=None); each block maps (x, *args, deterministic) -> x.
    `special` (input_ids - vocab_size) marks prefix tuning's special tokens (lora_jax.prefix.layer_input).
    """

    block: Callable[..., nn.Module]
    config: Any
    num_layers: int

    @nn.compact
    def __call__(self, x: jax.Array, *args, special: jax.Array | None = None):
        block = maybe_remat(self.block, self.config.remat, len(args) + 1)
        for i in range(self.num_layers):
            x = block(self.config, name=str(i))(layer_input(self, str(i), x, special), *args)
        return x


class CachedLayers(nn.Module):
    """`num_layers` blocks `block(config, i)` named "0", "1", ..., each reading and writing its own entry of a KV
    cache (a list with one entry per layer, or None when not decoding).

    Called as (x, cache, *args, deterministic, special=None) -> (x, cache); each block maps (x, kv, *args,
    deterministic) -> (x, kv), where kv is its layer's cache entry or None. `special` as in `Layers`.
    """

    block: Callable[..., nn.Module]
    config: Any
    num_layers: int

    @nn.compact
    def __call__(self, x: jax.Array, cache: list | None, *args, special: jax.Array | None = None):
        block = maybe_remat(self.block, self.config.remat, len(args) + 2)
        new_cache = []
        for i in range(self.num_layers):
            x = layer_input(self, str(i), x, special)
            x, kv = block(self.config, i, name=str(i))(x, None if cache is None else cache[i], *args)
            new_cache.append(kv)
        return x, (None if cache is None else new_cache)


def check_positions(config: Any, length: int, start: int = 0) -> None:
    """Refuse, when the model is traced, `length` tokens counted from position `start` (a key/value prefix's l_p)
    that would run past the model's learned position table: a lookup there reads NaN, silently."""
    limit = max_positions(config)
    if limit is not None and start + length > limit:
        after = f" after a {start}-token key/value prefix" if start else ""
        raise ValueError(
            f"{length} tokens{after} need {start + length} positions, more than the model's {limit}; shorten the "
            f"input (data.max_len, or generate fewer tokens){' or use a smaller prefix.l_p' if start else ''}."
        )


@partial(jax.checkpoint, static_argnums=(2,))
def masked_softmax(scores: jax.Array, mask: jax.Array, dtype: Any) -> jax.Array:
    """softmax over keys in float32 (bf16 logits lose the small differences), cast to `dtype`.

    Masked scores become float32's minimum, not -inf: a row with no visible key (a padded query) gets a uniform
    distribution instead of NaN, as in transformers; its output is never used. Checkpointed: the backward pass keeps
    the scores and recomputes the softmax, instead of keeping the masked scores and their exponentials as well.
    """
    scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def heads_first(x: jax.Array) -> jax.Array:
    """(batch, length, heads, head_dim) -> (batch, heads, length, head_dim): the layout keys and values are kept in
    (and the KV cache holds), so attention's batched matmuls read them without a transpose."""
    return x.swapaxes(1, 2)


def attention_scores(q: jax.Array, k: jax.Array, preferred_element_type: Any = jnp.float32) -> jax.Array:
    """Per-head q.k for q (batch, q_len, heads, head_dim) and head-major k (batch, kv_heads, k_len, head_dim) ->
    (batch, heads, q_len, k_len).

    kv_heads < heads is grouped-query attention (Ainslie et al. 2023): query head i reads key head
    i // (heads / kv_heads), as transformers' repeat_kv, without materialising the repeated keys.
    Computed on head-major operands: XLA:CPU's batched matmul runs 2-3x faster on (b, h, t, d) than on (b, t, h, d)
    (RoBERTa-base 8x128, one layer's attention forward + backward 14.5 -> 11 ms). Keys come head-major
    (`heads_first`) so that a decoding step does not transpose the whole KV cache of every layer to read it."""
    heads, kv_heads = q.shape[2], k.shape[1]
    if heads == kv_heads:
        return jnp.einsum("bhqd,bhkd->bhqk", q.swapaxes(1, 2), k, preferred_element_type=preferred_element_type)
    batch, length, _, dim = q.shape
    grouped = q.reshape(batch, length, kv_heads, heads // kv_heads, dim).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", grouped, k, preferred_element_type=preferred_element_type)
    return scores.reshape(batch, heads, length, k.shape[2])


def attend(probs: jax.Array, v: jax.Array) -> jax.Array:
    """Attention weights (batch, heads, q_len, k_len) applied to head-major values (batch, kv_heads, k_len,
    head_dim) -> (batch, q_len, heads, head_dim), grouped as `attention_scores`."""
    batch, heads, length, keys = probs.shape
    kv_heads = v.shape[1]
    if heads == kv_heads:
        return jnp.einsum("bhqk,bhkd->bhqd", probs, v).swapaxes(1, 2)
    grouped = probs.reshape(batch, kv_heads, heads // kv_heads, length, keys)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", grouped, v)
    return out.reshape(batch, heads, length, v.shape[-1]).swapaxes(1, 2)


# ------------------------------------------------------------------------------------------------------------
# Rotary position embeddings (Su et al. 2021), as transformers' Llama computes them
# ------------------------------------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "llama3")


def rope_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> np.ndarray:
    """The (head_dim / 2,) float32 inverse frequencies theta^(-2i/d), rescaled as `scaling` says.

    `scaling` is config.json's rope_scaling (or rope_parameters): `linear` divides every frequency by `factor`;
    `llama3` (Llama 3.1) divides the low frequencies by `factor`, keeps the high ones and interpolates between.
    """
    inv_freq = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(np.float32)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; use one of {list(ROPE_TYPES)} or none.")
    if kind == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        context = float(scaling["original_max_position_embeddings"])
        wavelength = 2 * math.pi / inv_freq
        scaled = np.where(wavelength > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= context / high) & (wavelength <= context / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x (batch, length, heads, head_dim) rotated by its positions (batch, length): the rotate-half form, where
    dimension i pairs with i + head_dim / 2. Angles in float32, as transformers; the rotation in x's dtype."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ------------------------------------------------------------------------------------------------------------
# KV cache for one-token-at-a-time decoding: a fixed size, so every decoding step has the same shapes
# ------------------------------------------------------------------------------------------------------------


def last_token(
    hidden: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None, pad_token_id: int | None
) -> jax.Array:
    """Each row's hidden state at its rightmost real token, as transformers' decoder classifiers pool: the last
    token that is not pad_token_id, or without one the attention mask's last."""
    if pad_token_id is not None:
        real = input_ids != pad_token_id
    elif attention_mask is not None:
        real = attention_mask.astype(bool)
    else:
        real = jnp.ones(input_ids.shape, bool)
    last = jnp.argmax(jnp.arange(input_ids.shape[1]) * real, axis=-1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def decoder_outputs(
    task: str,
    hidden: jax.Array,
    cache: list | None,
    lm_head: Callable[[jax.Array], jax.Array],
    score: Callable[[jax.Array], jax.Array],
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    pad_token_id: int | None,
    last_logits_only: bool = False,
) -> dict[str, Any]:
    """A decoder's outputs for its task: {"last_hidden_state", "cache" (if decoding), "logits" (causal-lm: the LM
    head, of the last position only with `last_logits_only`; sequence-classification: `score` of the last real
    token)}. `lm_head` and `score` build their layers when called, inside the caller's compact method."""
    out: dict[str, Any] = {"last_hidden_state": hidden}
    if cache is not None:
        out["cache"] = cache
    if task == "causal-lm":
        out["logits"] = lm_head(hidden[:, -1:] if last_logits_only else hidden)
    elif task == "sequence-classification":
        out["logits"] = score(last_token(hidden, input_ids, attention_mask, pad_token_id))
    return out


def family_init_cache(module: nn.Module, batch: int, max_length: int) -> list:
    """An empty cache from the `init_cache` of the family file that defines `module` (t5.py, gpt2.py, ...)."""
    return importlib.import_module(type(module).__module__).init_cache(module.config, batch, max_length)


def empty_cache(layers: int, batch: int, max_length: int, heads: int, head_dim: int, dtype: Any) -> list:
    """One {"k", "v"} pair of head-major (batch, heads, max_length, head_dim) zeros per layer, in the compute
    dtype."""
    zeros = jnp.zeros((batch, heads, max_length, head_dim), jnp.dtype(dtype))
    return [{"k": zeros, "v": zeros} for _ in range(layers)]


def write_cache(kv: dict, k: jax.Array, v: jax.Array, index: jax.Array | int) -> dict:
    """`kv` with this call's head-major keys/values (batch, heads, length, head_dim) written at slots index..;
    attention then reads the whole cache."""
    k = jax.lax.dynamic_update_slice_in_dim(kv["k"], k.astype(kv["k"].dtype), index, axis=2)
    v = jax.lax.dynamic_update_slice_in_dim(kv["v"], v.astype(kv["v"].dtype), index, axis=2)
    return {**kv, "k": k, "v": v}


def causal_cache_mask(
    shape: tuple[int, int], key_mask: jax.Array | None, cache: list | None, index: jax.Array | int
) -> jax.Array:
    """(batch, 1, queries, keys) mask for `shape` = (batch, queries) tokens written at slots index..

    Causal over absolute slots: the query at slot index + i sees slots <= its own, and only those `key_mask`
    (batch, keys) allows. With a cache, keys are all its slots and `key_mask` must cover them.
    """
    batch, length = shape
    keys = length if cache is None else cache[0]["k"].shape[2]
    key_mask = jnp.ones((batch, keys), bool) if key_mask is None else key_mask.astype(bool)
    if key_mask.shape != (batch, keys):
        raise ValueError(
            f"attention_mask has shape {key_mask.shape}, expected {(batch, keys)}; with a cache it must "
            "cover the whole cache (batch, max_length)."
        )
    causal = jnp.arange(keys)[None, :] <= (index + jnp.arange(length))[:, None]
    return causal[None, None, :, :] & key_mask[:, None, None, :]
