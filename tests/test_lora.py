"""The LoRA parameter transform: wrapping, the layer, the optimizer mask, merging, counting, bad input."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_jax.layers import Dense
from lora_jax.lora import LoraConfig, LoraError, lora_params, lora_wrap, merge, strip_lora, unmerge
from lora_jax.methods import count_params, lora_optimizer, partition, trainable_mask, unpartition
from lora_jax.tree import filter_leaves, leaf_paths
from tests.tiny import tiny

QV = LoraConfig(r=4, alpha=8, targets=("query", "value"))


def perturb_lora_b(params, seed: int = 0, scale: float = 0.1):
    """Give every lora_b a random value, as training would, so LoRA actually changes the output."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    key = jax.random.key(seed)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        name = str(getattr(path[-1], "key", ""))
        if name.startswith("lora_b"):
            leaf = scale * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def test_wrap_adds_leaves_beside_targeted_kernels_only():
    _, params, _ = tiny()
    wrapped = lora_wrap(params, QV, jax.random.key(1))
    added = {p for p, _ in leaf_paths(wrapped)} - {p for p, _ in leaf_paths(params)}
    expected = {
        f"params.layer_{i}.{m}.{leaf}"
        for i in range(2)
        for m in ("query", "value")
        for leaf in ("lora_a", "lora_b", "lora_scale")
    }
    assert added == expected
    q = wrapped["params"]["layer_0"]["query"]
    assert q["lora_a"].shape == (16, 4) and q["lora_b"].shape == (4, 16)
    assert float(q["lora_scale"]) == 2.0
    assert not np.any(np.asarray(q["lora_b"]))
    # Untouched subtrees are the very same objects.
    assert wrapped["params"]["classifier"] is params["params"]["classifier"]
    assert wrapped["params"]["layer_0"]["key"] is params["params"]["layer_0"]["key"]


def test_zero_init_b_gives_exactly_the_base_output():
    model, params, x = tiny()
    for init in ("kaiming", "gaussian"):
        wrapped = lora_wrap(
            params, LoraConfig(r=4, targets=("query", "value", "c_fc"), init=init), jax.random.key(2)
        )
        np.testing.assert_array_equal(model.apply(wrapped, x), model.apply(params, x))


def test_lora_path_changes_output_and_merge_matches_unmerged():
    model, params, x = tiny()
    wrapped = perturb_lora_b(lora_wrap(params, QV, jax.random.key(1)))
    unmerged = model.apply(wrapped, x)
    assert not np.allclose(unmerged, model.apply(params, x), atol=1e-4)
    merged = merge(wrapped)
    assert {p for p, _ in leaf_paths(merged)} == {p for p, _ in leaf_paths(params)}
    np.testing.assert_allclose(model.apply(merged, x), unmerged, rtol=1e-5, atol=1e-6)


def _dot_shapes(jaxpr) -> list[tuple[tuple[int, ...], ...]]:
    """Operand shapes of every dot_general in a jaxpr, nested calls included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(tuple(v.aval.shape) for v in eqn.invars))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found.extend(_dot_shapes(inner))
    return found


def test_layer_never_materialises_the_full_update():
    model, params, x = tiny()
    wrapped = perturb_lora_b(lora_wrap(params, QV, jax.random.key(1)))
    shapes = _dot_shapes(jax.make_jaxpr(model.apply)(wrapped, x).jaxpr)
    assert ((10, 16), (16, 4)) in shapes and ((10, 4), (4, 16)) in shapes  # (x A) B over the 2 x 5 tokens
    assert ((16, 4), (4, 16)) not in shapes  # never A B
    grad_shapes = _dot_shapes(jax.make_jaxpr(jax.grad(lambda p: model.apply(p, x).sum()))(wrapped).jaxpr)
    assert ((16, 4), (4, 16)) not in grad_shapes


def test_merge_then_unmerge_recovers_the_kernels():
    _, params, _ = tiny()
    wrapped = perturb_lora_b(lora_wrap(params, LoraConfig(r=4, targets=("all-linear",)), jax.random.key(3)))
    restored = unmerge(merge(wrapped), lora_params(wrapped))
    assert jax.tree.structure(restored) == jax.tree.structure(wrapped)
    for (path, a), (_, b) in zip(leaf_paths(wrapped), leaf_paths(restored), strict=True):
        eps = np.finfo(np.float32).eps * max(1.0, float(np.abs(a).max()))
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 4 * eps, path


def test_merge_folds_in_float32_for_bf16_kernels():
    model, params, x = tiny()
    bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    wrapped = perturb_lora_b(lora_wrap(bf16, QV, jax.random.key(1)), scale=1e-3)
    merged = merge(wrapped)
    kernel = merged["params"]["layer_0"]["query"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    q = wrapped["params"]["layer_0"]["query"]
    exact = np.asarray(q["kernel"], np.float32) + 2.0 * (
        np.asarray(q["lora_a"], np.float32) @ np.asarray(q["lora_b"], np.float32)
    )
    # One bf16 rounding of the exact float32 sum, not an accumulation of bf16 roundings.
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(jnp.asarray(exact).astype(jnp.bfloat16)))


def test_fused_kernel_slices_are_adapted_separately():
    model, params, x = tiny()
    config = LoraConfig(r=2, targets=("c_fc.a", "c_fc.c"), fused={"c_fc": ("a", "b", "c")})
    wrapped = perturb_lora_b(lora_wrap(params, config, jax.random.key(4)))
    fc = wrapped["params"]["layer_1"]["c_fc"]
    assert {k for k in fc if k.startswith("lora_a")} == {"lora_a_a", "lora_a_c"}
    assert fc["lora_b_a"].shape == (2, 16)
    merged = merge(wrapped)
    delta = np.asarray(merged["params"]["layer_1"]["c_fc"]["kernel"]) - np.asarray(fc["kernel"])
    assert np.abs(delta[:, 16:32]).max() == 0.0  # slice b untouched
    assert np.abs(delta[:, :16]).max() > 0 and np.abs(delta[:, 32:]).max() > 0
    np.testing.assert_allclose(model.apply(merged, x), model.apply(wrapped, x), rtol=1e-5, atol=1e-6)
    # The whole fused kernel is one target too (PEFT's view of GPT-2's c_attn).
    whole = lora_wrap(
        params, LoraConfig(r=2, targets=("c_fc",), fused={"c_fc": ("a", "b", "c")}), jax.random.key(4)
    )
    assert whole["params"]["layer_0"]["c_fc"]["lora_b"].shape == (2, 48)


def test_init_of_one_adapter_does_not_depend_on_the_others():
    _, params, _ = tiny()
    one = lora_wrap(params, LoraConfig(targets=("query",)), jax.random.key(5))
    two = lora_wrap(params, LoraConfig(targets=("query", "value")), jax.random.key(5))
    a1 = one["params"]["layer_1"]["query"]["lora_a"]
    np.testing.assert_array_equal(a1, two["params"]["layer_1"]["query"]["lora_a"])
    assert not np.array_equal(a1, two["params"]["layer_0"]["query"]["lora_a"])


def test_init_distributions():
    params = {"m": {"kernel": np.zeros((1024, 512), np.float32)}}
    kaiming = lora_wrap(params, LoraConfig(r=64, targets=("m",)), jax.random.key(0))["m"]["lora_a"]
    assert np.abs(kaiming).max() <= 1 / math.sqrt(1024)
    assert np.std(kaiming) == pytest.approx(1 / math.sqrt(3 * 1024), rel=0.02)
    gauss = lora_wrap(params, LoraConfig(r=64, targets=("m",), init="gaussian"), jax.random.key(0))["m"][
        "lora_a"
    ]
    assert np.std(gauss) == pytest.approx(1 / 64, rel=0.02)


def test_scales():
    params = {
        "m": {"kernel": np.zeros((64, 64), np.float32)},
        "n": {"kernel": np.zeros((64, 64), np.float32)},
    }
    plain = lora_wrap(params, LoraConfig(r=16, alpha=32, targets=("m",)), jax.random.key(0))
    assert float(plain["m"]["lora_scale"]) == 2.0
    rs = lora_wrap(params, LoraConfig(r=16, alpha=32, targets=("m",), rslora=True), jax.random.key(0))
    assert float(rs["m"]["lora_scale"]) == 8.0
    per = LoraConfig(r=8, alpha=8, targets=("m", "n"), rank_pattern={"n": 2}, alpha_pattern={"n": 4})
    wrapped = lora_wrap(params, per, jax.random.key(0))
    assert wrapped["n"]["lora_a"].shape == (64, 2) and float(wrapped["n"]["lora_scale"]) == 2.0
    assert wrapped["m"]["lora_a"].shape == (64, 8) and float(wrapped["m"]["lora_scale"]) == 1.0


def test_optimizer_trains_lora_and_freezes_everything_else_bit_exactly():
    model, params, x = tiny()
    config = LoraConfig(r=4, targets=("query", "value"), train_also=("classifier",))
    wrapped = lora_wrap(params, config, jax.random.key(1))
    tx = lora_optimizer(optax.adamw(1e-2, weight_decay=0.1), wrapped, config)
    state = tx.init(wrapped)
    # Frozen leaves carry no optimizer state: Adam's moments exist for the trainable leaves only.
    moments = sum(np.size(leaf) for leaf in jax.tree.leaves(state))
    trainable = count_params(wrapped, config).trainable
    assert moments <= 2 * trainable + 16
    labels = jnp.array([0, 2])

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(
            lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), labels).mean()
        )(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    p = wrapped
    for _ in range(5):
        p, state, loss = step(p, state)
    mask = dict(leaf_paths(trainable_mask(wrapped, config)))
    for (path, before), (_, after) in zip(leaf_paths(wrapped), leaf_paths(p), strict=True):
        if mask[path]:
            assert not np.array_equal(before, after), f"{path} did not train"
        else:
            np.testing.assert_array_equal(before, after, err_msg=f"{path} changed")


def test_gradients_exist_only_for_trainable_leaves():
    model, params, x = tiny()
    config = LoraConfig(r=4, targets=("query",), bias="lora_only")
    wrapped = perturb_lora_b(lora_wrap(params, config, jax.random.key(1)))
    trainable, frozen = partition(wrapped, trainable_mask(wrapped, config))
    grads = jax.grad(lambda t: model.apply(unpartition(t, frozen), x).sum())(trainable)
    got = {p for p, _ in leaf_paths(grads)}
    expected = {f"params.layer_{i}.query.{n}" for i in range(2) for n in ("lora_a", "lora_b", "bias")}
    assert got == expected
    assert all(np.abs(g).max() > 0 for _, g in leaf_paths(grads))
    assert jax.tree.structure(unpartition(trainable, frozen)) == jax.tree.structure(wrapped)


def test_bias_modes_and_train_also():
    _, params, _ = tiny()
    wrap = lambda **kw: lora_wrap(params, LoraConfig(targets=("query",), **kw), jax.random.key(0))
    trains = lambda p, c: {path for path, m in leaf_paths(trainable_mask(p, c)) if m}
    none = LoraConfig(targets=("query",))
    assert all(".lora_" in path for path in trains(wrap(), none))
    all_bias = LoraConfig(targets=("query",), bias="all")
    assert {p for p in trains(wrap(bias="all"), all_bias) if p.endswith("bias")} == {
        p for p, _ in leaf_paths(params) if p.endswith("bias")
    }
    head = LoraConfig(targets=("query",), train_also=("classifier",))
    assert {"params.classifier.kernel", "params.classifier.bias"} <= trains(wrap(), head)


def test_lora_config_dropout_is_what_the_layer_applies_in_training_only():
    model, params, x = tiny()
    config = dataclasses.replace(QV, dropout=0.5)
    wrapped = perturb_lora_b(lora_wrap(params, config, jax.random.key(1)))
    plain = filter_leaves(wrapped, lambda path: not path.endswith(".lora_dropout"))  # same A and B, no dropout
    eval_out = model.apply(wrapped, x)
    np.testing.assert_array_equal(eval_out, model.apply(plain, x))
    train = lambda p, seed: model.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(seed)})
    np.testing.assert_array_equal(train(plain, 0), eval_out)  # dropout 0: training is deterministic
    train_a, train_b = train(wrapped, 0), train(wrapped, 1)
    assert not np.allclose(train_a, eval_out) and not np.allclose(train_a, train_b)
    # The rate is the config's: with W = 0 and A = B = I the layer's output is its dropped LoRA input.
    assert float(wrapped["params"]["layer_0"]["query"]["lora_dropout"]) == 0.5
    h = jax.random.normal(jax.random.key(5), (256, 16))
    dense = Dense(16)
    layer = lora_wrap(dense.init(jax.random.key(0), h), dataclasses.replace(config, r=16, targets=(".*",)),
                      jax.random.key(0))["params"]  # fmt: skip
    identity = {"kernel": jnp.zeros((16, 16)), "lora_a": jnp.eye(16), "lora_b": jnp.eye(16)}
    layer = {**layer, **identity, "lora_scale": jnp.float32(1)}
    y = np.asarray(dense.apply({"params": layer}, h, deterministic=False, rngs={"dropout": jax.random.key(9)}))
    dropped = y == 0
    np.testing.assert_allclose(y[~dropped], 2 * np.asarray(h)[~dropped], rtol=1e-6)
    assert 0.45 < dropped.mean() < 0.55
    # With B = 0 the LoRA path is zero, so dropout on it changes nothing.
    zero = lora_wrap(params, config, jax.random.key(1))
    np.testing.assert_array_equal(train(zero, 0), model.apply(params, x))
    assert count_params(zero, config) == count_params(lora_wrap(params, QV, jax.random.key(1)), QV)


def test_roberta_base_query_value_r8_is_294912_lora_params():
    shapes = {
        "roberta": {
            "encoder": {
                "layer": {
                    str(i): {
                        "attention": {
                            "self": {
                                m: {"kernel": np.zeros((768, 768), np.float32)}
                                for m in ("query", "key", "value")
                            }
                        }
                    }
                    for i in range(12)
                }
            }
        }
    }
    wrapped = lora_wrap(shapes, LoraConfig(r=8, alpha=8, targets=("query", "value")), jax.random.key(0))
    assert count_params(wrapped).trainable == 294_912


@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 4),
    d=st.integers(2, 48),
    d_out=st.integers(2, 48),
    r=st.integers(1, 48),
    targets=st.sampled_from([("q",), ("q", "v"), ("q", "k", "v", "o")]),
)
def test_counts_and_round_trip_over_random_shapes(layers, d, d_out, r, targets):
    r = min(r, d, d_out)
    params = {
        "layer": {
            str(i): {
                m: {"kernel": np.ones((d, d_out), np.float32), "bias": np.zeros(d_out, np.float32)}
                for m in ("q", "k", "v", "o")
            }
            for i in range(layers)
        }
    }
    wrapped = lora_wrap(params, LoraConfig(r=r, alpha=2 * r, targets=targets), jax.random.key(d))
    count = count_params(wrapped)
    assert count.trainable == layers * len(targets) * r * (d + d_out)
    assert count.total == layers * 4 * d_out * (d + 1) + count.trainable
    if d == d_out:
        assert count.trainable == 2 * layers * len(targets) * d * r  # the paper's 2 L d r per matrix type
    wrapped = perturb_lora_b(wrapped, seed=r)
    restored = unmerge(merge(wrapped), lora_params(wrapped))
    for (_, a), (_, b) in zip(leaf_paths(wrapped), leaf_paths(restored), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert jax.tree.structure(strip_lora(wrapped)) == jax.tree.structure(params)


# --------------------------------------------------------------------------------------------------------------
# Bad input: one clear error each
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -3}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"alpha": 0}, "alpha must be > 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"init": "xavier"}, "init must be 'kaiming' or 'gaussian'"),
        ({"bias": "some"}, "bias must be"),
        ({"targets": ()}, "targets is empty"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(LoraError, match=message):
        LoraConfig(**kwargs)


def test_target_matching_nothing_lists_available_kernels():
    _, params, _ = tiny()
    with pytest.raises(LoraError, match=r"\['qq'\] match no kernel; available: .*layer_<i>\.query"):
        lora_wrap(params, LoraConfig(targets=("query", "qq")), jax.random.key(0))


def test_target_matching_only_an_excluded_head_says_so():
    _, params, _ = tiny()
    with pytest.raises(LoraError, match=r"\['classifier'\] only match modules under LoraConfig.exclude"):
        lora_wrap(params, LoraConfig(targets=("query", "classifier")), jax.random.key(0))
    wrapped = lora_wrap(params, LoraConfig(r=2, targets=("classifier",), exclude=()), jax.random.key(0))
    assert "lora_a" in wrapped["params"]["classifier"]


def test_rank_above_min_dim_and_wrapping_twice():
    _, params, _ = tiny()
    with pytest.raises(LoraError, match="rank 17 exceeds min"):
        lora_wrap(params, LoraConfig(r=17, targets=("query",)), jax.random.key(0))
    wrapped = lora_wrap(params, QV, jax.random.key(0))
    with pytest.raises(LoraError, match="already carry LoRA leaves"):
        lora_wrap(wrapped, QV, jax.random.key(0))


def test_config_round_trips_through_dict():
    config = LoraConfig(r=4, targets=["q", "v"], fused={"c_attn": ["q", "k", "v"]}, rank_pattern={"q": 2})
    assert LoraConfig.from_dict(config.to_dict()) == config
    with pytest.raises(LoraError, match="Unknown LoraConfig fields"):
        LoraConfig.from_dict({"rank": 4})
