"""DistilBERT in Flax against transformers' torch models, and the parameter count of PEFT's seed example."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.lora import lora_wrap, merge
from lora_jax.methods import count_params
from lora_jax.models import distilbert, hub
from lora_jax.models.spec import config_from_hf, params_from_hf, params_to_hf
from lora_jax.tree import leaf_paths

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
TINY = dict(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=40)
HF_CLASSES = {"base": "DistilBertModel", "sequence-classification": "DistilBertForSequenceClassification"}


def make_hf(task: str, path, num_labels: int = 3, seed: int = 0, cls: str | None = None, **overrides):
    """A random-init tiny transformers model, saved to `path`; returns it in eval mode."""
    torch.manual_seed(seed)
    config = transformers.DistilBertConfig(**{**TINY, **overrides}, num_labels=num_labels)
    model = getattr(transformers, cls or HF_CLASSES[task])(config).eval()
    with torch.no_grad():  # fresh LayerNorms are exactly 1/0; random ones check the scale/bias mapping
        for name, p in model.named_parameters():
            if "layer_norm" in name.lower():
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def padded_batch(seed: int = 0):
    """Two rows of 9 tokens; the second padded after 5."""
    ids = np.random.default_rng(seed).integers(3, 100, size=(2, 9))
    mask = np.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 0, 0
    return ids, mask


def torch_outputs(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    result = {"last_hidden_state": out.hidden_states[-1].numpy()}
    if getattr(out, "logits", None) is not None:
        result["logits"] = out.logits.numpy()
    return result


def flax_outputs(module, params, ids, mask, deterministic=True, rng=None):
    def run(p, i, m, r):
        rngs = None if r is None else {"dropout": r}
        return module.apply({"params": p}, i, m, deterministic=deterministic, rngs=rngs)

    out = jax.jit(run)(params, jnp.asarray(ids), jnp.asarray(mask), rng)
    return {k: np.asarray(v) for k, v in out.items()}


def max_diff(ours, theirs, mask):
    real = mask.astype(bool)  # pad positions are garbage in both; compare real tokens only
    diffs = {"last_hidden_state": np.abs(ours["last_hidden_state"][real] - theirs["last_hidden_state"][real])}
    if "logits" in theirs:
        assert ours["logits"].shape == theirs["logits"].shape
        diffs["logits"] = np.abs(ours["logits"] - theirs["logits"])
    return {k: float(v.max()) for k, v in diffs.items()}


@pytest.mark.parametrize(
    "task,num_labels,overrides",
    [
        ("base", 2, {}),
        ("sequence-classification", 3, {}),
        ("sequence-classification", 1, {}),  # regression
        ("sequence-classification", 2, {"activation": "relu", "sinusoidal_pos_embds": True}),
    ],
)
def test_matches_transformers_with_padding(tmp_path, task, num_labels, overrides):
    hf = make_hf(task, tmp_path, num_labels=num_labels, **overrides)
    ids, mask = padded_batch()
    module, params, _, config = hub.from_pretrained(tmp_path, task=task)
    assert isinstance(config, distilbert.Config) and config.model_type == "distilbert"
    diffs = max_diff(flax_outputs(module, params, ids, mask), torch_outputs(hf, ids, mask), mask)
    assert max(diffs.values()) <= TOL, diffs
    if task != "base":
        assert config.num_labels == num_labels


def test_token_type_ids_are_ignored(tmp_path):
    make_hf("sequence-classification", tmp_path)
    module, params, _, _ = hub.from_pretrained(tmp_path, task="sequence-classification")
    ids, mask = padded_batch()
    apply = jax.jit(lambda i, m, t: module.apply({"params": params}, i, m, t)["logits"])
    np.testing.assert_array_equal(apply(ids, mask, np.ones_like(ids)), apply(ids, mask, None))


def test_sinusoidal_init_matches_transformers():
    hf = transformers.DistilBertModel(transformers.DistilBertConfig(**TINY, sinusoidal_pos_embds=True))
    embeddings = distilbert.Embeddings(distilbert.Config(**TINY, sinusoidal_pos_embds=True))
    params = jax.jit(embeddings.init, static_argnums=2)(jax.random.key(0), jnp.zeros((1, 3), jnp.int32), True)
    ours = params["params"]["position_embeddings"]["embedding"]
    theirs = hf.embeddings.position_embeddings.weight.detach().numpy()
    assert np.abs(np.asarray(ours) - theirs).max() <= 1e-6


def test_params_to_hf_round_trip(tmp_path):
    hf = make_hf("sequence-classification", tmp_path)
    module, params, _, config = hub.from_pretrained(tmp_path, task="sequence-classification")
    state = params_to_hf(params, config, "sequence-classification")
    theirs = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert set(state) == set(theirs)
    for key, value in state.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)
    back, new = params_from_hf(state, config, "sequence-classification")
    assert new == []
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), params, back))

    base = params_to_hf({"distilbert": params["distilbert"]}, config, "base")
    assert set(base) == set(transformers.DistilBertModel(hf.config).state_dict())  # no prefix, as HF saves


def test_lora_merged_export_loads_in_transformers(tmp_path):
    make_hf("sequence-classification", tmp_path / "hf")
    module, params, _, config = hub.from_pretrained(tmp_path / "hf", task="sequence-classification")
    lora = hub.lora_config("distilbert", ["q", "v", "o", "mlp"], r=4, alpha=8)
    wrapped = lora_wrap(params, lora, jax.random.key(1))
    # B starts at zero; make it non-zero so the export really carries the adapter.
    wrapped = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.5 if str(path[-1].key).startswith("lora_b") else x, wrapped
    )
    ids, mask = padded_batch(1)
    ours = flax_outputs(module, wrapped, ids, mask)
    plain, merged = flax_outputs(module, params, ids, mask), flax_outputs(module, merge(wrapped), ids, mask)
    assert max_diff(ours, plain, mask)["last_hidden_state"] > 0.1
    assert max(max_diff(ours, merged, mask).values()) <= TOL
    hub.to_pretrained(config, wrapped, tmp_path / "out", "sequence-classification")
    exported = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    diffs = max_diff(ours, torch_outputs(exported, ids, mask), mask)
    assert max(diffs.values()) <= TOL, diffs


def test_mlm_and_base_checkpoints_load_with_fresh_head(tmp_path):
    mlm = make_hf("base", tmp_path / "mlm", cls="DistilBertForMaskedLM")
    _, params, _, config = hub.from_pretrained(tmp_path / "mlm", task="sequence-classification", num_labels=2)
    word = params["distilbert"]["embeddings"]["word_embeddings"]["embedding"]
    np.testing.assert_array_equal(word, mlm.distilbert.embeddings.word_embeddings.weight.detach().numpy())
    state = {k: v.numpy() for k, v in mlm.state_dict().items()}
    _, new = params_from_hf(state, config, "sequence-classification")
    assert sorted(new) == [f"{m}.{leaf}" for m in ("classifier", "pre_classifier") for leaf in ("bias", "kernel")]
    assert params["classifier"]["kernel"].shape == (TINY["dim"], 2)
    assert float(jnp.abs(params["classifier"]["bias"]).max()) == 0.0

    base = make_hf("base", tmp_path / "base")  # keys without the distilbert. prefix
    _, params, _, _ = hub.from_pretrained(tmp_path / "base", task="sequence-classification")
    q = params["distilbert"]["transformer"]["layer"]["1"]["attention"]["q_lin"]["kernel"]
    np.testing.assert_array_equal(q, base.transformer.layer[1].attention.q_lin.weight.detach().numpy().T)

    del state["distilbert.transformer.layer.0.ffn.lin1.weight"]
    with pytest.raises(KeyError, match="ffn.lin1.weight"):
        params_from_hf(state, config, "sequence-classification")


def tiny_shapes(task="sequence-classification", **kw):
    config = distilbert.Config(**{**TINY, "num_labels": 3, **kw})
    return config, jax.eval_shape(
        lambda: distilbert.build(config, task).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    )


def zeros_like_shapes(shapes):
    """Real numpy arrays of the right shapes that allocate nothing (a broadcast scalar)."""
    return jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), shapes)


def test_param_tree_mirrors_hf_names():
    _, shapes = tiny_shapes()
    paths = {p for p, _ in leaf_paths(shapes)}
    for expected in [
        "distilbert.embeddings.word_embeddings.embedding",
        "distilbert.embeddings.position_embeddings.embedding",
        "distilbert.embeddings.LayerNorm.scale",
        "distilbert.transformer.layer.0.attention.q_lin.kernel",
        "distilbert.transformer.layer.1.attention.out_lin.bias",
        "distilbert.transformer.layer.0.sa_layer_norm.scale",
        "distilbert.transformer.layer.0.ffn.lin1.kernel",
        "distilbert.transformer.layer.0.ffn.lin2.kernel",
        "distilbert.transformer.layer.1.output_layer_norm.bias",
        "pre_classifier.kernel",
        "classifier.kernel",
    ]:
        assert expected in paths, expected
    assert not any("token_type" in p or "pooler" in p for p in paths)


@pytest.mark.parametrize(
    "name,modules", [("q", {"attention.q_lin"}), ("v", {"attention.v_lin"}), ("o", {"attention.out_lin"}),
                     ("mlp", {"ffn.lin1", "ffn.lin2"})]
)  # fmt: skip
def test_lora_targets_pick_the_right_kernels(name, modules):
    _, shapes = tiny_shapes()
    wrapped = lora_wrap(zeros_like_shapes(shapes), hub.lora_config("distilbert", [name]), jax.random.key(1))
    adapted = [p.rsplit(".", 1)[0] for p, _ in leaf_paths(wrapped) if p.endswith("lora_a")]
    assert len(adapted) == len(modules) * TINY["n_layers"], adapted
    assert {p.split(".", 4)[-1] for p in adapted} == modules


def test_dropout_changes_outputs_and_remat_keeps_gradients():
    one_layer = {**TINY, "n_layers": 1, "num_labels": 2}
    module = distilbert.build(distilbert.Config(**one_layer), "sequence-classification")
    remat = distilbert.build(distilbert.Config(**one_layer, remat=True), "sequence-classification")
    ids, mask = map(jnp.asarray, padded_batch())
    params = jax.jit(module.init)(jax.random.key(0), ids, mask)["params"]
    det = flax_outputs(module, params, ids, mask)["logits"]
    drop = jax.jit(lambda key: module.apply({"params": params}, ids, mask, deterministic=False, rngs={"dropout": key}))
    a, b = (np.asarray(drop(jax.random.key(i))["logits"]) for i in (1, 2))
    assert not np.allclose(a, det) and not np.allclose(a, b)

    loss = lambda p, m: m.apply({"params": p}, ids, mask)["logits"].sum()
    grads = [jax.jit(jax.grad(loss), static_argnums=1)(params, m) for m in (module, remat)]
    assert max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), *grads))) <= 1e-5


def test_bad_configs_fail_with_one_clear_line():
    with pytest.raises(ValueError, match="must divide dim"):
        distilbert.Config(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="activation='mish' is not supported"):
        config_from_hf({"model_type": "distilbert", "activation": "mish"}, "base")
    with pytest.raises(ValueError, match="handles model_type"):
        config_from_hf({"model_type": "bert"}, "base", family=distilbert.SPEC)
    with pytest.raises(ValueError, match="supports tasks"):
        distilbert.build(distilbert.Config(), "causal-lm")


# ------------------------------------------------------------------------------------------------------------
# The count from PEFT's seed example: distilbert-base-uncased, 2 labels, LoRA r=8 alpha=32 on q_lin, v_lin
# ------------------------------------------------------------------------------------------------------------


def base_uncased_config() -> distilbert.Config:
    """distilbert-base-uncased's shape, from transformers' defaults (no download): they are that checkpoint."""
    hf = transformers.DistilBertConfig(num_labels=2)
    expected = dict(vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072, max_position_embeddings=512)
    assert {k: getattr(hf, k) for k in expected} == expected
    return config_from_hf(hf.to_dict(), "sequence-classification")


def seed_example_lora():
    return hub.lora_config("distilbert", ["q", "v"], r=8, alpha=32, train_also=["pre_classifier", "classifier"])


def test_seed_example_count():
    config = base_uncased_config()
    assert config.num_labels == 2
    shapes = jax.eval_shape(
        lambda: distilbert.build(config, "sequence-classification").init(
            jax.random.key(0), jnp.zeros((1, 2), jnp.int32)
        )["params"]
    )
    params = lora_wrap(zeros_like_shapes(shapes), seed_example_lora(), jax.random.key(0))
    count = count_params(params, seed_example_lora())
    assert (count.trainable, count.total) == (739_586, 67_102_466)

    # Derived piece by piece: LoRA adds r * (d_in + d_out) per adapted kernel; the head trains in full.
    d, r, layers = config.dim, 8, config.n_layers
    lora_size = layers * 2 * r * (d + d)
    head = sum(np.prod(s.shape) for p, s in leaf_paths(shapes) if p.split(".")[0] in distilbert.SPEC.heads)
    assert head == (d * d + d) + (d * 2 + 2) == 590_592 + 1_538 == 592_130
    assert count.trainable == lora_size + head
    assert count.total == sum(np.prod(s.shape) for _, s in leaf_paths(shapes)) + lora_size
    # PEFT's "all params" also counts the frozen copy modules_to_save keeps of each trained head module.
    assert count.total + head == 67_694_596


def test_seed_example_count_matches_peft():
    peft = pytest.importorskip("peft")
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(num_labels=2))
    peft_model = peft.get_peft_model(
        model, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=32, target_modules=["q_lin", "v_lin"])
    )
    trainable, total = peft_model.get_nb_trainable_parameters()
    frozen_copies = sum(
        p.numel() for n, p in peft_model.named_parameters() if "original_module" in n
    )  # modules_to_save's untouched originals of pre_classifier and classifier
    assert (trainable, total, frozen_copies) == (739_586, 67_694_596, 592_130)
    assert total - frozen_copies == 67_102_466
