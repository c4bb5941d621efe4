"""The adapter bank: stacked adapters on one base switch without recompiling, serve mixed batches row by row, combine
as PEFT's add_weighted_adapter does, and merge into / switch out of the base, against PEFT and per-row merged runs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import bank as lb
from lora_jax.adapters import save_adapter
from lora_jax.adapters_peft import _our_module
from lora_jax.combination import combine_adapters, drop_mask
from lora_jax.lora import LoraConfig, LoraError, lora_params, lora_wrap, merge, strip_lora
from lora_jax.models import gpt2, hub, llama
from lora_jax.tree import combine, leaf_paths
from tests.test_hub import perturb_lora_b
from tests.test_models_bert import make_hf

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TOL = 1e-5
PEFT_ADAPTERS = {  # name: (r, alpha, targets); different ranks, alphas and targets on purpose
    "x": (4, 8, ["query", "value"]),
    "y": (2, 6, ["query", "key"]),
    "z": (4, 3, ["query", "value"]),
}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT and three PEFT adapters on it: (folder, module, params, torch PeftModel with a, b, c)."""
    folder = tmp_path_factory.mktemp("bert")
    base = make_hf("bert", "base", folder / "base")
    torch.manual_seed(0)
    model = None
    for name, (r, alpha, targets) in PEFT_ADAPTERS.items():
        config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    model.eval()
    model.save_pretrained(folder / "adapters")
    module, params, _, _ = hub.from_pretrained(folder / "base", task="base")
    return folder, module, params, model


def peft_dir(folder, name):
    return folder / "adapters" / name  # save_pretrained puts adapters not named "default" in subfolders


def bert_bank(bert, names=("x", "y", "z"), **kw):
    folder, _, params, _ = bert
    bank = lb.new_bank(params, **kw)
    for name in names:
        bank = lb.load(bank, name, peft_dir(folder, name), model_type="bert")
    return bank


def batch(rows=4, length=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 100, (rows, length))
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    return jnp.asarray(np.where(mask, ids, 0)), jnp.asarray(mask)


def hidden(module, params, ids, mask):
    out = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m)["last_hidden_state"])(params, ids, mask)
    return np.asarray(out) * np.asarray(mask)[..., None]  # pad positions are garbage in every implementation


def test_switching_and_same_shape_loads_never_recompile(bert):
    _, module, params, _ = bert
    bank = bert_bank(bert, names=("x", "y"))
    traces = []

    @jax.jit
    def forward(base, stack, slot, ids, mask):
        traces.append(1)
        return module.apply({"params": lb.select(base, stack, slot)}, ids, mask)["last_hidden_state"]

    ids, mask = batch()
    run = lambda bank, name: np.asarray(
        forward(bank.base, bank.stack, lb.active_slot(lb.activate(bank, name)), ids, mask)
    )
    outs = {name: run(bank, name) for name in ("x", "y", None, "x")}
    bank = lb.load(bank, "z", peft_dir(bert[0], "z"), model_type="bert")  # same targets and rank as "x": fits
    outs["z"] = run(bank, "z")
    bank = lb.add(lb.delete(bank, "x"), "x2", lb.adapter(bank, "x"))  # into the freed slot
    outs["x2"] = run(bank, "x2")
    assert len(traces) == 1 and forward._cache_size() == 1
    for name, out in outs.items():
        merged = params if name is None else merge(combine(params, lb.adapter(bank, "x2" if name == "x" else name)))
        want = np.asarray(_apply(module, merged, ids, mask)["last_hidden_state"])
        np.testing.assert_allclose(out, want, atol=TOL, rtol=0)
    assert np.abs(outs["x"] - outs[None]).max() > 1e-2 and np.abs(outs["x"] - outs["y"]).max() > 1e-2
    assert bank.names == ["x2", "y", "z"] and len(bank.slots) == 4
    # O(adapter), not O(model): adding and deleting never copied a base weight.
    assert all(x is y for (_, x), (_, y) in zip(leaf_paths(bank.base), leaf_paths(params), strict=True))


def test_a_wider_adapter_relayouts_the_stack_and_keeps_the_others(bert):
    _, _, params, _ = bert
    bank = bert_bank(bert, names=("x", "y"), capacity=2, r_max=2)
    before = {n: lb.adapter(bank, n) for n in bank.names}
    wide = lora_params(perturb_lora_b(lora_wrap(params, LoraConfig(r=6, targets=("dense",)), jax.random.key(3))))
    bank = lb.add(bank, "wide", wide)
    assert bank.r_max == 6 and len(bank.slots) == 4
    for name, tree in before.items():
        for (p, x), (q, y) in zip(leaf_paths(tree), leaf_paths(lb.adapter(bank, name)), strict=True):
            assert p == q
            np.testing.assert_array_equal(x, y)
    a = bank.stack_leaf("bert.encoder.layer.0.attention.self.query", "lora_a")
    assert a.shape == (4, 32, 6) and not np.asarray(a[:, :, 4:]).any()  # padded ranks are exact zeros


def test_lora_jax_and_peft_files_load_into_one_bank(bert, tmp_path):
    folder, module, params, _ = bert
    config = LoraConfig(r=3, alpha=5.0, targets=("value", "output.dense"))
    ours = perturb_lora_b(lora_wrap(params, config, jax.random.key(1)))
    save_adapter(tmp_path / "ours", ours, config)
    bank = lb.load(bert_bank(bert, names=("y",)), "ours", tmp_path / "ours")
    ids, mask = batch()
    got = hidden(module, lb.select(bank.base, bank.stack, bank.slot("ours")), ids, mask)
    np.testing.assert_allclose(got, hidden(module, merge(ours), ids, mask), atol=TOL, rtol=0)


def one_line_error(fn, match):
    with pytest.raises(LoraError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_errors_name_the_fix(bert, tmp_path):
    folder, _, params, _ = bert
    bank = bert_bank(bert, names=("x", "y"))
    one_line_error(lambda: bank.slot("nope"), r"No adapter 'nope' in the bank; it holds \['x', 'y'\]")
    one_line_error(lambda: lb.activate(bank, "nope"), "No adapter 'nope'")
    one_line_error(lambda: lb.add(bank, "x", lb.adapter(bank, "y")), "already holds an adapter 'x'")
    make_hf("bert", "base", tmp_path / "wide", hidden_size=48)
    _, wide, _, _ = hub.from_pretrained(tmp_path / "wide", task="base")
    other = lora_params(lora_wrap(wide, LoraConfig(r=2), jax.random.key(0)))
    one_line_error(lambda: lb.add(bank, "other", other), "different base")
    one_line_error(lambda: lb.add(bank, "xx", {"nowhere": {"lora_a": jnp.ones((2, 2))}}), "wrong base")
    config = LoraConfig(r=2, targets=("query",))
    save_adapter(tmp_path / "ours", lora_wrap(params, config, jax.random.key(0)), config)
    with open(tmp_path / "ours" / "adapter.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    one_line_error(lambda: lb.load(bank, "bad", tmp_path / "ours"), "checksum")
    adapters = [lb.adapter(bank, "x"), lb.adapter(bank, "y")]
    one_line_error(lambda: combine_adapters(adapters, [1.0, 1.0], "svd", rank=7), "exceeds the sum of the source")
    one_line_error(lambda: combine_adapters(adapters, [1.0, 1.0], "linear"), "needs equal ranks")
    one_line_error(lambda: lb.new_bank(lora_wrap(params, config, jax.random.key(0))), "strip_lora")


# ---------------------------------------------------------------------------------------------------------------
# Mixed batches
# ---------------------------------------------------------------------------------------------------------------

ROW_IDS = [1, -1, 0, 2, 1, 0]  # slots of a, b, c: a row each, one row bare


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, ids, mask):
    return module.apply({"params": params}, ids, mask)


def rows_alone(module, params, bank, ids, mask, out_key="last_hidden_state"):
    """Each row run on its own with its adapter merged into the base."""
    outs = []
    for i, slot in enumerate(ROW_IDS):
        p = params if slot < 0 else merge(combine(params, lb.adapter(bank, bank.slots[slot])))
        outs.append(np.asarray(_apply(module, p, ids[i : i + 1], mask[i : i + 1])[out_key])[0])
    return np.stack(outs)


def test_mixed_batch_bert_equals_rows_alone_and_peft(bert):
    _, module, params, model = bert
    bank = bert_bank(bert)
    ids, mask = batch(rows=len(ROW_IDS))
    routed = jax.jit(lambda base, stack, i, m, r: module.apply({"params": lb.route(base, stack, r)}, i, m))
    ours = np.asarray(routed(bank.base, bank.stack, ids, mask, jnp.array(ROW_IDS))["last_hidden_state"])
    real = np.asarray(mask, bool)
    alone = rows_alone(module, params, bank, ids, mask)
    np.testing.assert_allclose(ours[real], alone[real], atol=TOL, rtol=0)
    names = ["__base__" if s < 0 else bank.slots[s] for s in ROW_IDS]
    with torch.no_grad():
        theirs = model(torch.tensor(np.asarray(ids)), torch.tensor(np.asarray(mask)), adapter_names=names)
    diff = np.abs(ours[real] - theirs.last_hidden_state.numpy()[real]).max()
    print(f"mixed batch vs PEFT adapter_names max abs diff {diff:.2e}")
    assert diff <= TOL
    same_adapter = np.asarray(routed(bank.base, bank.stack, ids, mask, jnp.full(len(ROW_IDS), 0))["last_hidden_state"])
    assert np.abs(same_adapter[real] - ours[real]).max() > 1e-2  # routing really changes rows


@functools.cache
def gpt2_bank():
    config = gpt2.Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2)
    module = gpt2.build(config, "causal-lm")
    params = jax.jit(module.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    bank = lb.new_bank(params, r_max=4)
    configs = {
        "qv": LoraConfig(r=4, alpha=8, targets=(gpt2.LORA_TARGETS["q"], gpt2.LORA_TARGETS["v"]), fused=gpt2.FUSED),
        "mlp": LoraConfig(r=2, alpha=2, targets=(gpt2.LORA_TARGETS["mlp"],), fused=gpt2.FUSED),
        "q": LoraConfig(r=3, alpha=9, targets=(gpt2.LORA_TARGETS["q"],), fused=gpt2.FUSED),
    }
    for i, (name, config) in enumerate(configs.items()):
        wrapped = perturb_lora_b(lora_wrap(params, config, jax.random.key(i)), seed=i)
        bank = lb.add(bank, name, lora_params(wrapped))
    return module, params, bank


def test_mixed_batch_gpt2_fused_slices_equal_rows_alone():
    module, params, bank = gpt2_bank()
    ids, mask = batch(rows=len(ROW_IDS), length=9, seed=1)
    routed = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m)["logits"])
    ours = np.asarray(routed(lb.route(bank.base, bank.stack, jnp.array(ROW_IDS)), ids, mask))
    alone = rows_alone(module, params, bank, ids, mask, out_key="logits")
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(ours[real], alone[real], atol=TOL, rtol=0)


@functools.cache
def llama_bank():
    config = llama.Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
    )  # fmt: skip
    module = llama.build(config, "causal-lm")
    params = jax.jit(module.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    bank = lb.new_bank(params, r_max=4)
    targets = llama.LORA_TARGETS
    configs = {
        "qv": LoraConfig(r=4, alpha=8, targets=(targets["q"], targets["v"])),
        "mlp": LoraConfig(r=2, alpha=2, targets=(targets["mlp"],)),
        "ko": LoraConfig(r=3, alpha=9, targets=(targets["k"], targets["o"])),
    }
    for i, (name, config) in enumerate(configs.items()):
        wrapped = perturb_lora_b(lora_wrap(params, config, jax.random.key(i)), seed=i)
        bank = lb.add(bank, name, lora_params(wrapped))
    return module, params, bank


DECODES = {  # each with the KV cache; beams: every beam of a prompt keeps that prompt's adapter
    "greedy": dict(max_new_tokens=8),
    "beam": dict(max_new_tokens=8, num_beams=3, length_penalty=0.9, no_repeat_ngram_size=2),
}


@pytest.mark.parametrize("decode", list(DECODES))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mixed_batch_decoding_with_the_kv_cache_equals_rows_alone(family, decode):
    module, params, bank = {"gpt2": gpt2_bank, "llama": llama_bank}[family]()
    generate = {"gpt2": gpt2.generate, "llama": llama.generate}[family]
    ids, mask = batch(rows=len(ROW_IDS), length=6, seed=2)
    kw = DECODES[decode]
    ours = np.asarray(generate(module, lb.route(bank.base, bank.stack, jnp.array(ROW_IDS)), ids, mask, **kw))
    alone = []
    for i, slot in enumerate(ROW_IDS):
        p = params if slot < 0 else merge(combine(params, lb.adapter(bank, bank.slots[slot])))
        alone.append(np.asarray(generate(module, p, ids[i : i + 1], mask[i : i + 1], **kw))[0])
    np.testing.assert_array_equal(ours, np.stack(alone))
    assert len({tuple(r) for r in ours}) > 2  # the adapters steer the continuations apart


def test_decoding_refuses_params_routed_for_other_rows():
    module, _, bank = gpt2_bank()
    ids, mask = batch(rows=4, length=6)
    routed = lb.route(bank.base, bank.stack, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="routed for 2 rows but 4 prompts"):
        gpt2.generate(module, routed, ids, mask, max_new_tokens=2)
    grouped, _ = lb.route_grouped(bank.base, bank.stack, jnp.array([0, 1, 2, -1]))
    one_line_error(lambda: gpt2.generate(module, grouped, ids, mask, max_new_tokens=2), "route_grouped cannot decode")


# ---------------------------------------------------------------------------------------------------------------
# Combination against PEFT's add_weighted_adapter
# ---------------------------------------------------------------------------------------------------------------


def peft_combined(model, params, names, weights, method, monkeypatch=None, **kw):
    """PEFT's add_weighted_adapter, read back as {module path: (lora_a, lora_b, scale)} in lora_jax's layout."""
    new = f"mix_{method}_{len(model.peft_config)}"
    model.add_weighted_adapter(names, weights, new, combination_type=method, **kw)
    out = {}
    for name, layer in model.base_model.model.named_modules():
        if hasattr(layer, "lora_A") and new in layer.lora_A:
            a, b = layer.lora_A[new].weight.detach().numpy(), layer.lora_B[new].weight.detach().numpy()
            out[_our_module(name, params)] = (a.T, b.T, layer.scaling[new])
    model.delete_adapter(new)
    return out


def ours_by_module(tree):
    return {m: (np.asarray(v["a"]), np.asarray(v["b"]), float(v["scale"])) for (m, _), v in lb.targets_of(tree).items()}


@pytest.mark.parametrize(
    "names,method,kw",
    [
        (("x", "z"), "linear", {}),
        (("x", "z"), "ties", {"density": 0.5}),
        (("x", "z"), "ties", {"density": 0.3, "majority_sign_method": "frequency"}),
        (("x", "z"), "magnitude_prune", {"density": 0.6}),
        (("x", "y"), "cat", {}),
        (("x", "y", "z"), "svd", {"svd_rank": 5}),
        (("x", "z"), "ties_svd", {"density": 0.5, "svd_rank": 3}),
    ],
)
def test_combination_equals_peft(bert, names, method, kw):
    _, _, params, model = bert
    bank = bert_bank(bert)
    weights = [0.7, -1.3, 0.4][: len(names)]
    theirs = peft_combined(model, params, list(names), weights, method, **kw)
    ours = ours_by_module(
        combine_adapters(
            [lb.adapter(bank, n) for n in names], weights, method, rank=kw.get("svd_rank"),
            density=kw.get("density"), majority_sign=kw.get("majority_sign_method", "total"),
        )
    )  # fmt: skip
    assert set(ours) == set(theirs)
    for module_path, (a, b, scale) in ours.items():
        ta, tb, tscale = theirs[module_path]
        assert scale == tscale == 1.0
        if method.endswith("svd"):  # singular vectors are defined up to sign: compare the update
            assert a.shape == ta.shape
            np.testing.assert_allclose(a @ b, ta @ tb, atol=TOL, rtol=0)
        else:
            np.testing.assert_allclose(a, ta[:, : a.shape[1]], atol=TOL, rtol=0)
            np.testing.assert_allclose(b, tb[: b.shape[0]], atol=TOL, rtol=0)
            assert not ta[:, a.shape[1] :].any()  # PEFT's cat pads ranks of adapters absent here with zeros


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_equals_peft_given_the_same_drop_masks(bert, monkeypatch, method):
    _, _, params, model = bert
    bank = bert_bank(bert)
    names, weights, density, key = ["x", "z"], [0.8, 0.5], 0.6, jax.random.key(7)
    sources = [lb.adapter(bank, n) for n in names]
    masks = {}  # PEFT's random_pruning sees torch tensors: find each one's name to hand it our mask
    for i, tree in enumerate(sources):
        for (module, suffix), leaves in lb.targets_of(tree).items():
            for factor in ("a", "b"):
                ours = np.asarray(leaves[factor])
                name = f"{module}{suffix}:{factor.upper()}"
                masks[np.ascontiguousarray(ours.T).tobytes()] = np.asarray(
                    drop_mask(key, name, i, density, ours.shape)
                ).T

    def same_mask(tensor, density, rescale):
        return tensor * torch.tensor(masks[tensor.detach().numpy().tobytes()]) / density

    monkeypatch.setattr(peft.utils.merge_utils, "random_pruning", same_mask)
    theirs = peft_combined(model, params, names, weights, method, density=density)
    ours = ours_by_module(combine_adapters(sources, weights, method, density=density, key=key))
    for module_path, (a, b, _) in ours.items():
        np.testing.assert_allclose(a, theirs[module_path][0], atol=TOL, rtol=0)
        np.testing.assert_allclose(b, theirs[module_path][1], atol=TOL, rtol=0)
    kept = np.mean([m.mean() for m in masks.values()])
    assert abs(kept - density) < 0.05  # the masks keep `density` of the entries


def test_dare_is_unbiased_over_keys():
    a = jax.random.normal(jax.random.key(0), (64, 4))
    tree = {"m": {"lora_a": a, "lora_b": jnp.ones((4, 8)), "lora_scale": jnp.float32(1.0)}}
    dare = lambda k: combine_adapters([tree, tree], [0.5, 0.5], "dare_linear", density=0.3, key=k)["m"]["lora_a"]
    runs = jax.jit(jax.vmap(dare))(jax.random.split(jax.random.key(1), 400))
    linear = combine_adapters([tree, tree], [0.5, 0.5], "linear")["m"]["lora_a"]
    assert np.abs(np.asarray(runs.mean(0) - linear)).max() < 0.25 * np.abs(np.asarray(linear)).max()
    assert 0.2 < float(np.mean(np.asarray(runs) == 0)) < 0.6  # about 1 - 0.3 of each, of two sources, dropped


def test_combination_jits_and_vmaps_over_weights(bert):
    bank = bert_bank(bert)
    sources = [lb.adapter(bank, n) for n in ("x", "y")]
    grid = jnp.stack([jnp.linspace(0, 1, 5), 1 - jnp.linspace(0, 1, 5)], axis=1)
    for method, kw in [("svd", {"rank": 3}), ("cat", {})]:
        swept = jax.jit(jax.vmap(functools.partial(combine_adapters, sources, method=method, **kw)))(grid)
        for i, w in enumerate(np.asarray(grid)):
            one = combine_adapters(sources, w, method, **kw)
            for (p, x), (q, y) in zip(leaf_paths(one), leaf_paths(swept), strict=True):
                assert p == q
                if p.endswith("lora_a") and method == "svd":  # compare the update, signs are free
                    continue
                # vmapped SVD runs a batched algorithm: its rounding differs by a few 1e-5
                atol = 1e-4 if method == "svd" else TOL
                np.testing.assert_allclose(np.asarray(y)[i], np.asarray(x), atol=atol, rtol=0)


def test_svd_of_bf16_adapters_runs_in_float32(bert):
    bank = bert_bank(bert)
    sources = [jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim == 2 else x, lb.adapter(bank, n)) for n in "xy"]
    got = lb.targets_of(combine_adapters(sources, [1.0, 0.5], "svd", rank=3))
    upcast = [jax.tree.map(lambda x: x.astype(jnp.float32), s) for s in sources]
    want = lb.targets_of(combine_adapters(upcast, [1.0, 0.5], "svd", rank=3))
    for t, leaves in got.items():
        assert leaves["a"].dtype == jnp.bfloat16
        product = np.asarray(leaves["a"], np.float32) @ np.asarray(leaves["b"], np.float32)
        reference = np.asarray(want[t]["a"] @ want[t]["b"])
        assert np.abs(product - reference).max() <= 2e-2 * np.abs(reference).max()  # bf16 rounding of the factors


# ---------------------------------------------------------------------------------------------------------------
# Merging into the base and switching merged adapters
# ---------------------------------------------------------------------------------------------------------------


def test_merge_unmerge_and_switch_are_exact_in_float32(bert):
    _, module, params, _ = bert
    bank = bert_bank(bert)
    ids, mask = batch()
    merged_a = lb.merge(bank, "x")
    assert not any(".lora_" in p for p, _ in leaf_paths(merged_a))
    routed = hidden(module, lb.select(bank.base, bank.stack, bank.slot("x")), ids, mask)
    np.testing.assert_allclose(hidden(module, merged_a, ids, mask), routed, atol=TOL, rtol=0)
    back = lb.unmerge(bank, merged_a, "x")
    worst = max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for (_, x), (_, y) in zip(leaf_paths(back), leaf_paths(params), strict=True)
    )
    print(f"unmerge(merge(W)) - W max abs {worst:.1e}")
    assert worst <= 1e-6
    switched = lb.switch(bank, merged_a, "x", "y")  # x adapts q, v; y adapts q, k
    direct = lb.merge(bank, "y")
    worst = max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for (_, x), (_, y) in zip(leaf_paths(switched), leaf_paths(direct), strict=True)
    )
    print(f"switch(x -> y) - merge(y) max abs {worst:.1e}")
    assert worst <= 1e-6
    assert strip_lora(switched).keys() == params.keys()


# ---------------------------------------------------------------------------------------------------------------
# Training K adapters in one step
# ---------------------------------------------------------------------------------------------------------------


def test_packed_training_equals_separate_runs_and_padding_stays_zero():
    import optax

    from lora_jax import packed as lp
    from lora_jax.methods import lora_optimizer, partition, trainable_mask, unpartition
    from tests.tiny import tiny

    model, params, _ = tiny(width=16)
    base = params["params"]
    settings = [  # (config, seed, learning rate): ranks, alphas, targets, seeds and rates all differ
        (LoraConfig(r=4, alpha=8, targets=("query", "value")), 0, 1e-2),
        (LoraConfig(r=2, alpha=2, targets=("query", "c_fc.a"), fused={"c_fc": ("a", "b", "c")}), 1, 3e-2),
        (LoraConfig(r=3, alpha=12, targets=("value", "proj")), 2, 5e-3),
    ]
    wrapped = [lora_wrap(base, c, jax.random.key(seed)) for c, seed, _ in settings]
    k, steps = len(settings), 4
    xs = jax.random.normal(jax.random.key(9), (k, steps, 3, 5, 16))  # each adapter its own data stream
    ys = jax.random.normal(jax.random.key(10), (k, steps, 3, 3))

    def loss_fn(p, batch, rng):
        x, y = batch
        return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    packed = lp.pack(base, [lora_params(w) for w in wrapped], [lr for *_, lr in settings], optax.adamw)
    step = lp.packed_step(loss_fn, optax.adamw)
    rngs = jax.random.split(jax.random.key(0), k)
    for t in range(steps):
        packed, losses = step(packed, (xs[:, t], ys[:, t]), rngs)
    assert losses.shape == (k,)

    for i, (w, (config, _, lr)) in enumerate(zip(wrapped, settings, strict=True)):
        tx = lora_optimizer(optax.adamw(lr), w, config)
        trainable, frozen = partition(w, trainable_mask(w, config))
        state = tx.init(trainable)

        @jax.jit
        def alone(trainable, state, x, y, frozen=frozen, tx=tx):
            grads = jax.grad(lambda tr: loss_fn(unpartition(tr, frozen), (x, y), None))(trainable)
            updates, state = tx.update(grads, state, trainable)
            return optax.apply_updates(trainable, updates), state

        for t in range(steps):
            trainable, state = alone(trainable, state, xs[i, t], ys[i, t])
        separate = lora_params(unpartition(trainable, frozen))
        ours = lp.unpack(packed, i, like=separate)
        for (p, x), (q, y) in zip(leaf_paths(separate), leaf_paths(ours), strict=True):
            assert p == q
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=TOL, rtol=0, err_msg=p)
        moved = lora_params(w)
        assert any(
            np.abs(np.asarray(x) - np.asarray(y)).max() > 1e-3
            for (_, x), (_, y) in zip(leaf_paths(separate), leaf_paths(moved), strict=True)
        )
    # Padded ranks, and kernels an adapter does not target, stayed exactly zero.
    for path, leaf in leaf_paths(packed.trainable):
        mask = dict(leaf_paths(packed.mask))[path]
        assert not np.asarray(leaf)[np.asarray(mask) == 0].any(), path


def test_grouped_rows_equal_gathered_rows(monkeypatch):
    """route_grouped (rows sorted into adapter groups, ragged_dot) gives what route (per-row gather) gives."""
    module, params, bank = gpt2_bank()
    ids, mask = batch(rows=len(ROW_IDS), length=9, seed=3)
    apply = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m)["logits"])
    gathered = np.asarray(lb.mixed_apply(apply, bank.base, bank.stack, jnp.array(ROW_IDS), ids, mask))
    monkeypatch.setattr(lb, "GROUPED_FROM", 1)  # 9-token rows now take the grouped path (off CPU)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    grouped = np.asarray(lb.mixed_apply(apply, bank.base, bank.stack, jnp.array(ROW_IDS), ids, mask))
    params_grouped, order = lb.route_grouped(bank.base, bank.stack, jnp.array(ROW_IDS))
    assert params_grouped["transformer"]["h"]["0"]["attn"]["c_attn"]["lora_a_q"].shape[0] == len(bank.slots) + 1
    assert list(np.asarray(jnp.array(ROW_IDS)[order])) == sorted(ROW_IDS)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(grouped[real], gathered[real], atol=TOL, rtol=0)
    alone = rows_alone(module, params, bank, ids, mask, out_key="logits")
    np.testing.assert_allclose(grouped[real], alone[real], atol=TOL, rtol=0)
