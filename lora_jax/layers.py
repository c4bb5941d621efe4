"""The LoRA-aware Dense layer every lora_jax model is built from, and the Dropout and norms they all use.

Without LoRA leaves it is exactly `flax.linen.Dense`. When `lora_wrap` has put `lora_a`/`lora_b`/`lora_scale`
beside its kernel, it adds scale * (dropout(x) @ A) @ B: two thin matmuls, never the d_in x d_out product W + AB,
so training pays for the rank-r path only. Whether the leaves exist is known when the function is traced, so a
model without adapters compiles to the plain program.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax import quant
from lora_jax.bottleneck import DOWN, DOWN_BIAS, LN_BIAS, LN_EPSILON, LN_SCALE, UP, UP_BIAS
from lora_jax.lora import LORA_A, LORA_B, LORA_DROPOUT, LORA_SCALE, LORA_SLICE

Dtype = Any
LORA_GROUPS = "lora_groups"  # rows per adapter group, beside stacked A/B (lora_jax.bank.route_grouped)
Initializer = Callable[..., jax.Array]


def token_dot(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
    """x (..., d_in) @ kernel (d_in, d_out) with every leading axis flattened into one token axis.

    The same product as `jnp.dot`, but its gradient with respect to the kernel then contracts one axis, not
    (batch, length): with two, XLA:CPU wrote the output gradient out transposed, fused into the elementwise op
    that made it, before the kernel-gradient dot (the copies were 40% of a LoRA step on SmolLM2-135M).
    """
    out = jnp.dot(x.reshape(-1, x.shape[-1]), kernel, precision=precision)
    return out.reshape(*x.shape[:-1], kernel.shape[-1])


class Dense(nn.Module):
    """`y = x W + b`, plus LoRA's low-rank path where the params carry one.

    Everything about the adapter comes from its leaves (`lora.lora_wrap`): `lora_a`/`lora_b`/`lora_scale` for the
    whole kernel, or `lora_a_q`... for slices of a fused kernel (GPT-2's c_attn), each placed by its `lora_slice_q`
    index and `lora_b_q`'s width, as loralib's MergedLinear; `lora_dropout` (present when LoraConfig.dropout > 0)
    drops the LoRA path's input in training and needs a 'dropout' rng when `deterministic` is False.
    A bottleneck adapter's leaves (`lora_jax.bottleneck`) add `h + up(relu(down(LN(h))))` on the output h.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        # A quantized kernel (a frozen QLoRA base) is read as it is and dequantized inside the matmul.
        stored = self.get_variable("params", "kernel") if self._has("kernel") else None
        quantized = quant.is_quantized(stored)
        if quantized:
            kernel = stored
        else:
            kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        )
        if quantized:
            x, bias = nn.dtypes.promote_dtype(x, bias, dtype=self.dtype or jnp.result_type(x, kernel.dtype))
            y = quant.matmul(x, kernel, self.precision)
        else:
            x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
            y = token_dot(x, kernel, self.precision)
        if bias is not None:
            y = y + bias
        return self._add_adapter(self._add_lora(x, y, deterministic))

    def _add_lora(self, x: jax.Array, y: jax.Array, deterministic: bool) -> jax.Array:
        own = self.variables.get("params", {})
        suffixes = sorted(name[len(LORA_A) :] for name in own if name.startswith(LORA_A))
        if not suffixes:
            return y
        h = Dropout(own[LORA_DROPOUT])(x, deterministic=deterministic) if LORA_DROPOUT in own else x
        for suffix in suffixes:
            low = self._low_rank(h, suffix, y.dtype)
            if suffix == "":
                y = y + low
                continue
            width = low.shape[-1]
            start = jnp.asarray(own[LORA_SLICE + suffix], jnp.int32) * width
            part = jax.lax.dynamic_slice_in_dim(y, start, width, axis=-1)
            y = jax.lax.dynamic_update_slice_in_dim(y, part + low, start, axis=-1)
        return y

    def _add_adapter(self, y: jax.Array) -> jax.Array:
        own = self.variables.get("params", {})
        if DOWN not in own:
            return y
        cast = lambda name: jnp.asarray(own[name]).astype(y.dtype)  # noqa: E731
        h = layer_norm(y, own[LN_SCALE], own[LN_BIAS], LN_EPSILON, y.dtype) if LN_SCALE in own else y
        h = jax.nn.relu(token_dot(h, cast(DOWN), self.precision) + cast(DOWN_BIAS))
        return y + token_dot(h, cast(UP), self.precision) + cast(UP_BIAS)

    def _has(self, name: str) -> bool:
        return self.has_variable("params", name)

    def _low_rank(self, h: jax.Array, suffix: str, dtype: Dtype) -> jax.Array:
        a = self.get_variable("params", LORA_A + suffix).astype(dtype)
        b = self.get_variable("params", LORA_B + suffix).astype(dtype)
        scale = self.get_variable("params", LORA_SCALE + suffix).astype(dtype)
        if a.ndim == 3 and self._has(LORA_GROUPS):  # rows sorted by adapter (lora_jax.bank.route_grouped)
            tokens = h.reshape(-1, h.shape[-1])
            sizes = self.get_variable("params", LORA_GROUPS) * (tokens.shape[0] // h.shape[0])
            t = jax.lax.ragged_dot(tokens, a, sizes, precision=self.precision)
            t = t * jnp.repeat(scale, sizes, total_repeat_length=tokens.shape[0])[:, None]
            return jax.lax.ragged_dot(t, b, sizes, precision=self.precision).reshape(*h.shape[:-1], -1)
        if a.ndim == 3:  # one adapter per row (lora_jax.bank.route): row i uses a[i], b[i], scale[i]
            rows = h.reshape(h.shape[0], -1, h.shape[-1])
            t = jnp.einsum("bti,bir->btr", rows, a, precision=self.precision) * scale[:, None, None]
            return jnp.einsum("btr,bro->bto", t, b, precision=self.precision).reshape(*h.shape[:-1], -1)
        # Scale the r-wide intermediate, not the d_out-wide result: same value, fewer multiplies.
        return token_dot(token_dot(h, a, self.precision) * scale, b, self.precision)


class Dropout(nn.Module):
    """Inverted dropout, as `flax.linen.Dropout`, its mask drawn from 16-bit halves of random 32-bit words.

    flax's version draws a float uniform per element (`random.bernoulli`), whose bits-to-float conversion costs
    about three times the random bits themselves on CPU. Comparing 16-bit random integers with round(rate * 2**16)
    needs no floats, and splitting each 32-bit draw into two halves (along the last axis, so a batch-sharded input
    keeps its sharding) halves the random-number work: one RoBERTa-base layer's masks 8.1 ms (a uint32 draw per
    element) -> 3.9-4.1 ms on this project's 2-core CPU, where threefry runs as a rolled loop. (Philox keys are
    faster still on CPU but do not lower under sharding.) The dropped fraction is the rounded rate (0.1 ->
    0.1000061) and kept values are scaled by its exact inverse, so the layer stays unbiased. Needs a 'dropout'
    rng when `deterministic` is False.
    """

    rate: float | jax.Array  # an array: LoRA's rate, read from the params (so known only when traced)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        if deterministic:
            return x
        if isinstance(self.rate, (int, float)):
            if self.rate == 0.0:
                return x
            if not 0.0 <= self.rate < 1.0:
                raise ValueError(f"dropout rate must be in [0, 1), got {self.rate}.")
            threshold = min(round(self.rate * 2**16), 2**16 - 1)
            keep_prob = jnp.asarray(1.0 - threshold / 2**16, x.dtype)
        else:
            threshold = jnp.minimum(jnp.round(jnp.asarray(self.rate, jnp.float32) * 2**16), 2**16 - 1)
            keep_prob = (1.0 - threshold / 2**16).astype(x.dtype)
        keep = random_uint16(self.make_rng("dropout"), x.shape) >= jnp.asarray(threshold, jnp.uint32)
        return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


def random_uint16(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform integers in [0, 2**16) (as uint32), two from each random 32-bit word."""
    rows, last = tuple(shape[:-1]), (shape[-1] if shape else 1)
    words = jax.random.bits(key, (*rows, (last + 1) // 2), jnp.uint32)
    return jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)[..., :last].reshape(shape)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, as `flax.linen.LayerNorm` (same `scale`/`bias` params) with torch's two-pass
    variance, computed in float32 and cast to `dtype`.

    Its backward pass keeps only the input and recomputes the statistics: autodiff of the plain formula keeps four
    (tokens x hidden) float32 tensors per norm. Together with the checkpointed softmax this took a RoBERTa-base
    8x128 LoRA step's XLA temporaries from 956 to 885 MB (after the activations' own 1244 -> 956 MB).
    """

    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (width,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (width,), self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, scale)
        return layer_norm(x, scale, bias, self.epsilon, jnp.dtype(dtype))


@partial(jax.checkpoint, static_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Dtype) -> jax.Array:
    x = x.astype(jnp.float32)
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(variance + epsilon)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis (Llama, Qwen2, Mistral): `scale * x / rms(x)`, no centring, no
    bias. Statistics in float32, the normalised input cast to `dtype` before the scale, as LlamaRMSNorm does.

    Lean backward pass as `LayerNorm`: only the input is kept, the statistics are recomputed.
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, scale)
        return rms_norm(x, scale, self.epsilon, jnp.dtype(dtype))


@partial(jax.checkpoint, static_argnums=(2, 3))
def rms_norm(x: jax.Array, scale: jax.Array, epsilon: float, dtype: Dtype) -> jax.Array:
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + epsilon)
    return y.astype(dtype) * scale.astype(dtype)
