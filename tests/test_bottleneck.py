"""The paper's Section 5.1 baselines (lora_jax.bottleneck): adapters start at the base model in every family and
change it once trained, only the method's leaves train, adapter files round-trip, the refusals, the counts."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import bottleneck
from lora_jax.adapters import load_adapter, load_adapter_method, save_adapter
from lora_jax.bottleneck import (
    ADAPTER_METHODS,
    DOWN,
    FT_TOP2,
    UP,
    AdapterError,
    adapter_layout,
    adapter_wrap,
    paper_adapter_count,
    strip_adapters,
)
from lora_jax.export import check_exports
from lora_jax.lora import LoraConfig, LoraError, merge
from lora_jax.methods import count_params, trainable_mask, unpartition
from lora_jax.models import hub
from lora_jax.models.spec import config_from_hf, param_shapes, unflatten
from lora_jax.sharding import make_mesh
from lora_jax.train import TrainConfig, prepare
from lora_jax.tree import leaf_paths, map_with_path
from tests.test_conformance import TINY

FAMILIES = ["bert", "distilbert", "deberta-v2", "gpt2", "llama", "t5"]
HEAD = LoraConfig(train_also=("classifier",))


def _tiny(model_type: str, task: str | None = None, **overrides):
    tiny = TINY[model_type]
    task = task or tiny.task
    config = config_from_hf({**tiny.config, **overrides, "model_type": model_type}, task)
    spec = hub.family(model_type)
    module = spec.build(config, task)
    ids = jnp.asarray(np.random.default_rng(0).integers(2, 90, (2, 7)), jnp.int32)
    inputs = [ids, jnp.ones_like(ids), ids][: spec.init_inputs]  # T5: ids, mask, decoder ids
    params = module.init(jax.random.key(0), *inputs)["params"]
    forward = jax.jit(lambda p: module.apply({"params": p}, *inputs)["logits"])
    return module, params, inputs, forward


def _perturb(params, names=(UP,), scale=0.5, keep=None):
    """Random noise on the leaves named `names` (or those `keep(path)` accepts)."""
    keep = keep or (lambda path: path.rsplit(".", 1)[-1] in names)
    return map_with_path(
        lambda path, x: x + scale * jax.random.normal(jax.random.key(len(path)), x.shape, x.dtype) if keep(path) else x,
        params,
    )


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_family_starts_at_the_base_and_the_adapter_then_acts(model_type):
    """Zero up-projections: the logits are the base's (to float rounding: the wrapped model compiles to another
    XLA program); a non-zero one changes them, so the layer really reads the leaves. adapter_h has every site,
    the superset of the other designs."""
    _, params, _, forward = _tiny(model_type)
    base = np.asarray(forward(params))
    wrapped = adapter_wrap(params, "adapter_h", hub.adapter_config(model_type, r=4), jax.random.key(1))
    np.testing.assert_allclose(np.asarray(forward(wrapped)), base, rtol=1e-5, atol=1e-6)
    changed = np.asarray(forward(_perturb(wrapped, (DOWN, UP))))
    assert np.abs(changed - base).max() > 1e-3 * np.abs(base).max()


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_each_design_places_its_adapters_and_starts_at_the_base(method):
    """2-layer GPT-2: H after attention and MLP (4), L/P after the MLP (2; L with its own LayerNorms), D after the
    MLP of the layers above drop_first (1)."""
    _, params, _, forward = _tiny("gpt2")
    config = hub.adapter_config("gpt2", r=4, drop_first=1)
    wrapped = adapter_wrap(params, method, config, jax.random.key(1))
    expected = {"adapter_h": (4, 0), "adapter_l": (2, 2), "adapter_p": (2, 0), "adapter_d": (1, 0)}[method]
    assert adapter_layout(wrapped) == expected
    sites = sorted(p.rsplit(".", 1)[0] for p, _ in leaf_paths(wrapped) if p.endswith(DOWN))
    if method == "adapter_d":
        assert sites == ["transformer.h.1.mlp.c_proj"]
    np.testing.assert_allclose(np.asarray(forward(wrapped)), np.asarray(forward(params)), rtol=1e-5, atol=1e-6)
    base = np.asarray(forward(params))
    names = (DOWN, UP, "adapter_ln_scale") if method == "adapter_l" else (DOWN, UP)
    assert np.abs(np.asarray(forward(_perturb(wrapped, names))) - base).max() > 1e-3 * np.abs(base).max()
    assert strip_adapters(wrapped) == params


def _train(module, params, method: str, steps: int = 3):
    """`steps` real steps of lora_jax.train's jitted step on a fixed random batch; returns the params after."""
    config = TrainConfig(method=method, lr=1e-2, warmup_ratio=0.0, weight_decay=0.0, progress=False)
    prepared = prepare(module, params, config, num_labels=3, total_micro_steps=steps, mesh=make_mesh(),
                       lora_config=HEAD)  # fmt: skip
    rng = np.random.default_rng(1)
    batch = {"input_ids": rng.integers(2, 90, (4, 7)).astype(np.int32), "attention_mask": np.ones((4, 7), np.int32),
             "labels": rng.integers(0, 3, 4).astype(np.int32), "weights": np.ones(4, np.float32)}  # fmt: skip
    state = prepared.state
    for _ in range(steps):
        state, _ = prepared.train_step(state, prepared.frozen, batch)
    return unpartition(state.trainable, prepared.frozen)


@pytest.mark.parametrize("method", ["adapter_h", "adapter_l", "adapter_d", FT_TOP2])  # adapter_p: adapter_l less LN
def test_only_the_methods_leaves_change_in_training(method):
    """A 3-layer BERT classifier through the trainer's step: exactly the leaves trainable_mask names move."""
    module, params, _, _ = _tiny("bert", "sequence-classification", num_hidden_layers=3, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)  # fmt: skip
    if method in ADAPTER_METHODS:
        params = adapter_wrap(params, method, hub.adapter_config("bert", r=4, drop_first=1), jax.random.key(1))
    before = {p: np.asarray(x).copy() for p, x in leaf_paths(params)}  # the step donates the trainable arrays
    after = dict(leaf_paths(_train(module, params, method)))
    moved = {p for p, x in before.items() if not np.array_equal(x, np.asarray(after[p]))}
    mask = {p for p, m in leaf_paths(trainable_mask(params, HEAD, method)) if m}
    assert moved == mask
    assert {p for p in mask if p.startswith("classifier")} == {"classifier.kernel", "classifier.bias"}
    if method in ADAPTER_METHODS:
        assert all(p in moved for p in before if p.endswith(UP))
    norms = {p for p in mask if ".LayerNorm." in p}
    if method != FT_TOP2:  # Houlsby trains the model's LayerNorms, the other adapters do not
        assert bool(norms) == (method == "adapter_h")
    if method == FT_TOP2:
        layers = {int(p.split("encoder.layer.")[1].split(".")[0]) for p in mask if "encoder.layer." in p}
        assert layers == {1, 2} and not mask - {p for p in mask if "encoder.layer." in p or "classifier" in p}


@pytest.mark.parametrize("method", ["adapter_l", FT_TOP2])
def test_adapter_file_round_trips_onto_the_base(method, tmp_path):
    module, base, _, forward = _tiny("bert", "sequence-classification")
    config = hub.adapter_config("bert", r=4)
    params = adapter_wrap(base, method, config, jax.random.key(1)) if method != FT_TOP2 else base
    mask = {p for p, m in leaf_paths(trainable_mask(params, HEAD, method)) if m}
    trained = _perturb(params, scale=0.1, keep=mask.__contains__)
    save_adapter(tmp_path / "a", trained, HEAD, method, config if method != FT_TOP2 else None)
    meta = json.loads((tmp_path / "a" / "lora_config.json").read_text())
    assert set(meta["shapes"]) == mask
    loaded, _ = load_adapter(tmp_path / "a", base)
    np.testing.assert_allclose(np.asarray(forward(loaded)), np.asarray(forward(trained)), rtol=1e-6, atol=1e-7)
    assert load_adapter_method(tmp_path / "a") == (method, config if method != FT_TOP2 else None)
    if method != FT_TOP2:  # an adapter for another width is refused by name
        _, other, _, _ = _tiny("bert", "sequence-classification", hidden_size=16, intermediate_size=32)
        with pytest.raises(LoraError, match="adapter_down.*d_model=32.*gives 16: wrong base model"):
            load_adapter(tmp_path / "a", other)


def test_refusals_are_one_line_naming_what_works(monkeypatch):
    _, params, _, _ = _tiny("gpt2")
    wrapped = adapter_wrap(params, "adapter_p", hub.adapter_config("gpt2", r=4), jax.random.key(1))
    with pytest.raises(LoraError, match="cannot be merged; save it as an adapter file"):
        merge(wrapped)
    with pytest.raises(AdapterError, match=r"adapter r=33 exceeds d_model=32 .*use adapter.r <= 32"):
        adapter_wrap(params, "adapter_h", hub.adapter_config("gpt2", r=33), jax.random.key(1))
    with pytest.raises(AdapterError, match=r"drop_first=2 leaves no layer of 2 .*drop_first <= 1"):
        adapter_wrap(params, "adapter_d", hub.adapter_config("gpt2", r=4, drop_first=2), jax.random.key(1))
    with pytest.raises(AdapterError, match="already carry adapter leaves"):
        adapter_wrap(wrapped, "adapter_p", hub.adapter_config("gpt2", r=4), jax.random.key(1))
    _, shallow, _, _ = _tiny("gpt2", n_layer=1)
    with pytest.raises(AdapterError, match=r"last 2 layers, but transformer.h has 1; use method=full"):
        trainable_mask(shallow, None, FT_TOP2)
    with pytest.raises(ValueError, match=r"exports=\[merged\] cannot hold adapter_h's adapter layers"):
        check_exports(("merged",), "adapter_h")
    original = hub.family
    monkeypatch.setattr(hub, "family", lambda t: dataclasses.replace(original(t), adapter_sites={}) if t == "gpt2"
                        else original(t))  # fmt: skip
    with pytest.raises(AdapterError, match=r"GPT-2 declares no adapter sites .*use method=lora, bitfit or full, or a "
                       r"family that has them: \['bert', 'deberta-v2'"):  # fmt: skip
        hub.adapter_config("gpt2")


@pytest.mark.parametrize(
    "method,r,adapters,norms",
    [("adapter_h", 64, 48, 0), ("adapter_h", 8, 48, 0), ("adapter_p", 16, 24, 0), ("adapter_l", 4, 24, 24)],
)
def test_eval_shape_counts_equal_the_papers_formula_on_roberta_large(method, r, adapters, norms):
    """RoBERTa-large's shapes, traced without allocating: the adapter leaves are exactly the paper's |Θ|."""
    config = config_from_hf(
        {"model_type": "roberta", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
         "intermediate_size": 4096, "vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1},
        "base",
    )  # fmt: skip
    shapes = unflatten(param_shapes(config, "base"))
    wrapped = jax.eval_shape(lambda p: adapter_wrap(p, method, hub.adapter_config("roberta", r=r), jax.random.key(0)),
                             shapes)  # fmt: skip
    assert adapter_layout(wrapped) == (adapters, norms)
    leaves = sum(int(np.prod(x.shape)) for p, x in leaf_paths(wrapped) if bottleneck.is_adapter_leaf(p))
    assert leaves == paper_adapter_count(adapters, 1024, r, norms)
    trained_norms = count_params(wrapped, None, method).trainable - leaves
    assert trained_norms == (2 * 1024 * (2 * 24 + 1) if method == "adapter_h" else 0)  # 2 per layer + embeddings


@pytest.mark.slow
def test_hydra_run_trains_an_adapter_and_exports_it(tmp_path):
    """method=adapter_h through experiment.run on the tiny BERT: run name, summary and adapter file say so."""
    from lora_jax.experiment import run
    from tests.conftest import save_tiny_bert, write_tiny_mrpc
    from tests.test_train import run_config

    tiny_bert = save_tiny_bert(tmp_path / "bert")
    glue = write_tiny_mrpc(tmp_path / "glue")
    cfg = run_config(tiny_bert, glue, tmp_path / "out", "method=adapter_h", "adapter.r=4", "optim.max_steps=2",
                     "optim.epochs=1")  # fmt: skip
    assert cfg.run == "adapter_h_r4_seed0"
    summary = run(cfg)
    assert summary["adapter"]["r"] == 4 and summary["exports"] == {"adapter": "adapter"}
    method, _ = load_adapter_method(tmp_path / "out" / "adapter")
    shapes = json.loads((tmp_path / "out" / "adapter" / "lora_config.json").read_text())["shapes"]
    assert method == "adapter_h" and summary["trainable_params"] == sum(int(np.prod(s)) for s in shapes.values())
    assert sum(int(np.prod(s)) for p, s in shapes.items() if bottleneck.is_adapter_leaf(p)) == paper_adapter_count(
        4, 32, 4
    )  # 2 layers x 2 sites of hidden 32, r 4
    assert any(".LayerNorm." in p for p in shapes) and any(p.startswith("classifier") for p in shapes)
