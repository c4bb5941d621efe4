"""A tiny transformer-shaped model built from lora_jax's Dense, for testing the core without a model family."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.layers import Dense


class Block(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        dense = lambda n, name: Dense(n, name=name)
        q = dense(self.width, "query")(x, deterministic)
        k = dense(self.width, "key")(x, deterministic)
        v = dense(self.width, "value")(x, deterministic)
        att = jax.nn.softmax(jnp.einsum("bsd,btd->bst", q, k) / jnp.sqrt(self.width), axis=-1)
        h = x + dense(self.width, "output")(jnp.einsum("bst,btd->bsd", att, v), deterministic)
        fused = dense(3 * self.width, "c_fc")(h, deterministic)
        return h + dense(self.width, "proj")(jax.nn.gelu(fused), deterministic)


class TinyModel(nn.Module):
    width: int = 16
    depth: int = 2
    num_labels: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        for i in range(self.depth):
            x = Block(self.width, name=f"layer_{i}")(x, deterministic)
        return nn.Dense(self.num_labels, name="classifier")(x.mean(axis=1))


def tiny(width: int = 16, depth: int = 2, seed: int = 0, **kw):
    model = TinyModel(width=width, depth=depth, **kw)
    x = jax.random.normal(jax.random.key(seed + 1), (2, 5, width))
    params = model.init(jax.random.key(seed), x)
    return model, params, x
