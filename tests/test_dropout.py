"""lora_jax's Dropout: the keep rate and the scaling it promises, and that it is flax's in every other respect."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.layers import Dropout, random_uint16


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keeps_one_minus_rate_and_preserves_the_mean(rate):
    x = jnp.ones((1000, 1000))
    y = np.asarray(Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)}))
    kept = y != 0
    n, p = kept.size, 1 - rate
    assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)  # 5 sigma of a binomial
    realised = 1 - round(rate * 2**16) / 2**16  # the rate is rounded to 16 bits
    assert abs(realised - p) <= 2**-17
    np.testing.assert_allclose(y[kept], 1 / realised, rtol=1e-6)
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


def test_identity_when_deterministic_or_rate_zero():
    x = jax.random.normal(jax.random.key(0), (8, 8))
    np.testing.assert_array_equal(Dropout(0.5).apply({}, x, deterministic=True), x)
    np.testing.assert_array_equal(Dropout(0.0).apply({}, x, deterministic=False), x)


def test_bfloat16_stays_bfloat16():
    x = jnp.ones((16, 16), jnp.bfloat16)
    y = Dropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize("shape", [(), (7,), (301, 999), (4, 3, 64)])
def test_16_bit_draws_are_uniform_and_the_two_halves_of_a_word_independent(shape):
    bits = np.asarray(random_uint16(jax.random.key(5), shape))
    assert bits.shape == shape and bits.max(initial=0) < 2**16
    if bits.size < 10_000:
        return
    assert abs(bits.mean() / (2**16 - 1) - 0.5) < 5 * np.sqrt(1 / 12 / bits.size)
    half = (shape[-1] + 1) // 2  # element j and j + half come from the same 32-bit word
    low, high = bits[..., : shape[-1] - half].ravel(), bits[..., half:].ravel()
    assert abs(np.corrcoef(low, high)[0, 1]) < 5 / np.sqrt(low.size)
