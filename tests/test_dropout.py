"""lora_jax's Dropout: the keep rate and the scaling it promises, and that it is flax's in every other respect."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.layers import Dropout


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keeps_one_minus_rate_and_preserves_the_mean(rate):
    x = jnp.ones((1000, 1000))
    y = np.asarray(Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)}))
    kept = y != 0
    n, p = kept.size, 1 - rate
    assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)  # 5 sigma of a binomial
    np.testing.assert_allclose(y[kept], 1 / p, rtol=1e-6)
    assert abs(y.mean() - 1.0) < 5 * np.sqrt((1 - p) / p / n)


def test_masks_are_independent_of_flax_but_deterministic_per_key():
    x = jax.random.normal(jax.random.key(0), (64, 64))
    apply = lambda key: Dropout(0.3).apply({}, x, deterministic=False, rngs={"dropout": key})  # noqa: E731
    np.testing.assert_array_equal(apply(jax.random.key(1)), apply(jax.random.key(1)))
    assert not np.array_equal(apply(jax.random.key(1)), apply(jax.random.key(2)))
    # Neighbouring rows use independent bits: their masks agree about as often as chance says.
    mask = np.asarray(apply(jax.random.key(1))) != 0
    agree = (mask[1:] == mask[:-1]).mean()
    assert abs(agree - (0.7**2 + 0.3**2)) < 0.03


def test_identity_when_deterministic_or_rate_zero_like_flax():
    x = jax.random.normal(jax.random.key(0), (8, 8))
    np.testing.assert_array_equal(Dropout(0.5).apply({}, x, deterministic=True), x)
    np.testing.assert_array_equal(Dropout(0.0).apply({}, x, deterministic=False), x)
    np.testing.assert_array_equal(nn.Dropout(0.5).apply({}, x, deterministic=True), x)


def test_bfloat16_stays_bfloat16():
    x = jnp.ones((16, 16), jnp.bfloat16)
    y = Dropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert y.dtype == jnp.bfloat16
