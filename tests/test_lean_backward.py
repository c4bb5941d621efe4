"""The ops whose backward pass keeps only their input (LayerNorm, RMSNorm, activations, masked softmax): same values and
gradients as the plain formulas / torch, and what they keep for the backward pass really is just the input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.ad_checkpoint import print_saved_residuals

from lora_jax.layers import LayerNorm, RMSNorm
from lora_jax.models.common import ACTIVATIONS, masked_softmax

SHAPE = (4, 16, 32)


def _x(seed: int = 0, shape=SHAPE) -> jax.Array:
    return 3.0 * jax.random.normal(jax.random.key(seed), shape) + 1.5  # an offset mean, as residual streams have


def _ln_params(width: int) -> dict:
    k1, k2 = jax.random.split(jax.random.key(7))
    return {"scale": 1 + 0.1 * jax.random.normal(k1, (width,)), "bias": 0.1 * jax.random.normal(k2, (width,))}


def test_layer_norm_matches_torch_values_and_gradients():
    x, params = _x(), _ln_params(SHAPE[-1])
    cotangent = jax.random.normal(jax.random.key(1), SHAPE)
    loss = lambda p, x: jnp.sum(LayerNorm(1e-5).apply({"params": p}, x) * cotangent)  # noqa: E731
    y = LayerNorm(1e-5).apply({"params": params}, x)
    grads, dx = jax.grad(loss, argnums=(0, 1))(params, x)

    tx = torch.tensor(np.asarray(x), requires_grad=True)
    tw = torch.tensor(np.asarray(params["scale"]), requires_grad=True)
    tb = torch.tensor(np.asarray(params["bias"]), requires_grad=True)
    ty = torch.nn.functional.layer_norm(tx, (SHAPE[-1],), tw, tb, 1e-5)
    (ty * torch.tensor(np.asarray(cotangent))).sum().backward()

    np.testing.assert_allclose(y, ty.detach().numpy(), atol=2e-6)
    np.testing.assert_allclose(dx, tx.grad.numpy(), atol=2e-5)
    np.testing.assert_allclose(grads["scale"], tw.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["bias"], tb.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_layer_norm_in_bf16_computes_in_float32_and_returns_bf16():
    x, params = _x(), _ln_params(SHAPE[-1])
    y32 = LayerNorm(1e-5).apply({"params": params}, x)
    y16 = LayerNorm(1e-5, dtype=jnp.bfloat16).apply({"params": params}, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05)


def _saved(fn, *args, capsys) -> list[str]:
    """The residuals the backward pass of `fn` keeps, as printed by jax, minus its arguments and constants."""
    print_saved_residuals(fn, *args)
    lines = capsys.readouterr().out.strip().splitlines()
    ignored = ("from the argument", "from a literal", "from a constant")
    return [line for line in lines if not any(s in line for s in ignored)]


def test_layer_norm_keeps_only_its_input(capsys):
    x, params = _x(), _ln_params(SHAPE[-1])
    assert _saved(lambda x: LayerNorm(1e-5).apply({"params": params}, x), x, capsys=capsys) == []
    plain = lambda x: jax.nn.standardize(x, axis=-1, epsilon=1e-5) * params["scale"] + params["bias"]  # noqa: E731
    assert len([s for s in _saved(plain, x, capsys=capsys) if "[4,16,32]" in s]) >= 2  # what it saves us


def test_rms_norm_matches_transformers_llama_values_and_gradients(capsys):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = _x()
    params = {"scale": _ln_params(SHAPE[-1])["scale"]}
    cotangent = jax.random.normal(jax.random.key(1), SHAPE)
    norm = lambda p, x: RMSNorm(1e-6).apply({"params": p}, x)  # noqa: E731
    grads, dx = jax.grad(lambda p, x: jnp.sum(norm(p, x) * cotangent), argnums=(0, 1))(params, x)

    ref = LlamaRMSNorm(SHAPE[-1], eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(np.asarray(params["scale"])))
    tx = torch.tensor(np.asarray(x), requires_grad=True)
    ty = ref(tx)
    (ty * torch.tensor(np.asarray(cotangent))).sum().backward()

    np.testing.assert_allclose(norm(params, x), ty.detach().numpy(), atol=2e-6)
    np.testing.assert_allclose(dx, tx.grad.numpy(), atol=2e-5)
    np.testing.assert_allclose(grads["scale"], ref.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    assert _saved(lambda x: norm(params, x), x, capsys=capsys) == []
    y16 = RMSNorm(1e-6, dtype=jnp.bfloat16).apply({"params": params}, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["gelu", "gelu_new", "quick_gelu", "silu"])
def test_activations_keep_only_their_input_and_differentiate_as_before(name, capsys):
    x = _x()
    assert _saved(ACTIVATIONS[name], x, capsys=capsys) == []
    reference = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "silu": jax.nn.silu,
    }[name]
    grad = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x)  # noqa: E731
    np.testing.assert_allclose(ACTIVATIONS[name](x), reference(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad(ACTIVATIONS[name]), grad(reference), rtol=1e-5, atol=1e-6)


def test_masked_softmax_keeps_only_the_scores_and_matches_autodiff(capsys):
    scores = _x(shape=(2, 3, 8, 8))
    mask = jnp.arange(8)[None, None, None, :] < jnp.array([8, 5])[:, None, None, None]
    assert _saved(lambda s: masked_softmax(s, mask, jnp.float32), scores, capsys=capsys) == []

    def plain(s):
        return jax.nn.softmax(jnp.where(mask, s, jnp.finfo(jnp.float32).min), axis=-1)

    weights = jax.random.normal(jax.random.key(2), scores.shape)
    grad = lambda f: jax.grad(lambda s: jnp.sum(f(s) * weights))(scores)  # noqa: E731
    np.testing.assert_allclose(masked_softmax(scores, mask, jnp.float32), plain(scores), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad(lambda s: masked_softmax(s, mask, jnp.float32)), grad(plain), atol=1e-6)
    assert np.all(np.asarray(grad(plain))[1, ..., 5:] == 0)  # masked keys get no gradient
