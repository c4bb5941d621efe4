"""Prefix-embedding and prefix-layer tuning (lora_jax.prefix) on tiny random models of every family it serves."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora, methods, prefix
from lora_jax.adapters import load_adapter, save_adapter
from lora_jax.data.prefix import SpecialTokens, insert_special, insert_special_causal
from lora_jax.export import check_exports
from lora_jax.lora import LoraConfig, LoraError
from lora_jax.methods import partition, trainable_mask
from lora_jax.models import bert, deberta, distilbert, gpt2, llama, t5
from lora_jax.objective import make_optimizer
from lora_jax.prefix import PrefixConfig, PrefixError, prefix_param_count, prefix_wrap, special_counts
from lora_jax.train import TrainConfig, TrainState, make_steps
from lora_jax.tree import leaf_paths, map_with_path

V = 60  # every tiny model's vocabulary: special ids are 60, 61, ...
FAMILIES = {
    "bert": (bert, dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=40, num_labels=3)),
    "roberta": (bert, dict(model_type="roberta", pad_token_id=1, vocab_size=V, hidden_size=32, num_hidden_layers=3,
                           num_attention_heads=4, intermediate_size=48, max_position_embeddings=40, num_labels=3)),
    "distilbert": (distilbert, dict(vocab_size=V, dim=32, n_layers=3, n_heads=4, hidden_dim=48,
                                    max_position_embeddings=40, num_labels=3)),
    "deberta": (deberta, dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                              intermediate_size=48, max_position_embeddings=40, relative_attention=True,
                              position_buckets=8, pos_att_type=["p2c", "c2p"], num_labels=3)),
    "gpt2": (gpt2, dict(vocab_size=V, n_positions=40, n_embd=32, n_layer=3, n_head=4, pad_token_id=0, num_labels=3)),
    "llama": (llama, dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40, pad_token_id=0,
                          num_labels=3)),
}  # fmt: skip
CONFIG = PrefixConfig(l_p=3, l_i=2)
TOKENS = SpecialTokens(V, CONFIG.l_p, CONFIG.l_i)


@functools.cache
def tiny(family: str, task: str = "sequence-classification"):
    family_module, kw = FAMILIES[family]
    module = family_module.build(family_module.Config(**kw), task)
    params = jax.jit(module.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    return module, params


def plain_batch() -> dict[str, np.ndarray]:
    """Two right-padded rows, [CLS]-style first token, pair texts."""
    ids = np.array([[2, 10, 11, 12, 3, 20, 21, 3], [2, 13, 14, 3, 22, 3, 0, 0]], np.int32)
    mask = (np.arange(8)[None, :] < np.array([[8], [6]])).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask}


def batch() -> dict[str, np.ndarray]:
    """`plain_batch` with the special tokens inserted after column 1 and after each row's first text."""
    return insert_special(plain_batch(), np.array([1, 1]), np.array([4, 3]), TOKENS, 0)


@functools.cache
def _jitted(module):
    return jax.jit(lambda params, ids, mask: module.apply({"params": params}, ids, mask))


def forward(module, params, data):
    return _jitted(module)(params, data["input_ids"], data["attention_mask"])


# ---------------------------------------------------------------------------------------------------------------
# The model side
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_reads_its_special_tokens_and_ignores_padding(family):
    """PreLayer's leaves include PreEmbed's (the embedding rows), so this covers both."""
    module, params = tiny(family)
    wrapped = prefix_wrap(params, module, CONFIG, jax.random.key(1), "prefix_layer")
    data = batch()
    logits = forward(module, wrapped, data)["logits"]
    assert logits.shape == (2, 3) and bool(jnp.isfinite(logits).all())
    # Padding stays padding: other ids under attention_mask 0 change nothing.
    other = {**data, "input_ids": np.where(data["attention_mask"] > 0, data["input_ids"], 7)}
    if family in ("gpt2", "llama"):  # these pool the last non-pad token: keep the pad id, vary what follows
        other = data
    np.testing.assert_allclose(forward(module, wrapped, other)["logits"], logits, atol=1e-5)
    # Each leaf reaches the text: perturb one at a time (not by a constant: LayerNorm would undo it) and watch the
    # last real token's hidden state, which every special token precedes.
    last = lambda out: np.asarray(out["last_hidden_state"])[[0, 1], [12, 10]]  # noqa: E731
    before = last(forward(module, wrapped, data))
    for path, leaf in leaf_paths(prefix.prefix_params(wrapped)):
        noise = jax.random.normal(jax.random.key(5), leaf.shape)
        bumped = jax.tree_util.tree_map_with_path(
            lambda p, x, path=path, noise=noise: x + noise if ".".join(k.key for k in p) == path else x, wrapped
        )
        moved = np.abs(last(forward(module, bumped, data)) - before).max()
        assert moved > 1e-3, f"{path} does not reach the text"


@pytest.mark.parametrize("method", prefix.TOKEN_METHODS)
def test_the_wrapped_decoder_starts_as_the_pretrained_one_reading_the_drawn_tokens(method):
    """GPT-2 with a leading prefix: the special tokens start as real vocabulary tokens, embedding and (PreLayer)
    every layer's activations, so the logits at the text equal the base model's on [drawn tokens, text]."""
    module, params = tiny("gpt2", "causal-lm")
    config = PrefixConfig(l_p=4, l_i=0)
    wrapped = prefix_wrap(params, module, config, jax.random.key(3), method)
    table = np.asarray(params["transformer"]["wte"]["embedding"])
    rows = np.asarray(wrapped["transformer"]["wte"]["prefix_embed"])
    drawn = np.argmin(((rows[:, None, :] - table[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(table[drawn], rows)
    text = np.array([[5, 9, 14, 30]])
    special = np.arange(V, V + 4)[None, :]
    run = lambda p, ids: forward(module, p, {"input_ids": ids, "attention_mask": np.ones_like(ids)})  # noqa: E731
    ours = run(wrapped, np.concatenate([special, text], 1))["logits"][:, 4:]
    base = run(params, np.concatenate([drawn[None], text], 1))["logits"][:, 4:]
    np.testing.assert_allclose(ours, base, atol=1e-4)


def test_cached_decoding_reads_the_replaced_activations():
    """PreLayer in a KV cache: prefill with the special tokens, then one token at a time, equals the full forward."""
    module, params = tiny("gpt2", "causal-lm")
    wrapped = prefix_wrap(params, module, CONFIG, jax.random.key(1), "prefix_layer")
    ids = jnp.array([[60, 61, 62, 5, 6, 63, 64, 7, 8]])
    ones = jnp.ones((1, 9), jnp.int32)
    full = forward(module, wrapped, {"input_ids": ids, "attention_mask": ones})["logits"]
    run = jax.jit(lambda x, cache, t: module.apply({"params": wrapped}, x, ones, cache=cache, cache_index=t))
    out = run(ids[:, :7], gpt2.init_cache(module.config, 1, 9), 0)
    steps = [out["logits"]]
    for t in (7, 8):
        out = run(ids[:, t : t + 1], out["cache"], t)
        steps.append(out["logits"])
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_params_without_prefix_leaves_give_the_plain_model():
    module, params = tiny("bert")
    wrapped = prefix_wrap(params, module, CONFIG, jax.random.key(1), "prefix_layer")
    plain = {"input_ids": np.array([[2, 10, 11, 3]]), "attention_mask": np.ones((1, 4), np.int32)}
    np.testing.assert_allclose(forward(module, wrapped, plain)["logits"], forward(module, params, plain)["logits"],
                               atol=1e-6)  # fmt: skip
    assert special_counts(wrapped) == CONFIG


@pytest.mark.parametrize("method", prefix.TOKEN_METHODS)
def test_gradients_reach_only_the_prefix_leaves_and_the_head(method):
    module, params = tiny("roberta")
    wrapped = prefix_wrap(params, module, CONFIG, jax.random.key(1), method)
    lora_config = LoraConfig(train_also=("classifier",))
    mask = dict(leaf_paths(trainable_mask(wrapped, lora_config, method)))
    trains = sorted(p for p, m in mask.items() if m)
    assert all(prefix.is_prefix_leaf(p) or p.startswith("classifier.") for p in trains)
    assert sum(prefix.is_prefix_leaf(p) for p in trains) == (2 if method == "prefix_embed" else 2 * 3)
    assert not any(m for p, m in leaf_paths(trainable_mask(wrapped, lora_config, "lora")) if prefix.is_prefix_leaf(p))
    trainable, frozen = partition(wrapped, trainable_mask(wrapped, lora_config, method))
    data = batch()

    def loss(t):
        out = forward(module, methods.unpartition(t, frozen), data)["logits"]
        return jnp.sum(out**2)

    grads = jax.grad(loss)(trainable)
    for path, g in leaf_paths(grads):
        assert np.abs(np.asarray(g)).max() > 0, f"no gradient reaches {path}"


@pytest.mark.parametrize("method", ["prefix_layer", "prefix_kv"])
def test_a_few_training_steps_reduce_the_loss(method):
    """The trainer's own step (make_steps, TrainConfig's AdamW) on a tiny RoBERTa whose head stays frozen: only the
    prefix (special tokens' activations, or keys and values) trains, and it alone fits two rows of different
    labels."""
    kw = dict(FAMILIES["roberta"][1], initializer_range=0.3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    module = bert.build(bert.Config(**kw), "sequence-classification")
    params = jax.jit(module.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    config = CONFIG if method in prefix.TOKEN_METHODS else PrefixConfig(CONFIG.num_special, 0)
    wrapped = prefix_wrap(params, module, config, jax.random.key(1), method)
    mask = trainable_mask(wrapped, LoraConfig(), method)
    trainable, frozen = partition(wrapped, mask)
    tx = make_optimizer(TrainConfig(lr=0.1, warmup_ratio=0.0, weight_decay=0.0), 25)
    train_step, _ = make_steps(module, tx, 3, seed=0)
    rows = batch() if method in prefix.TOKEN_METHODS else plain_batch()
    data = {**rows, "labels": np.array([0, 2]), "weights": np.ones(2, np.float32)}
    state = TrainState(trainable, tx.init(trainable), jnp.zeros((), jnp.int32))
    step = jax.jit(train_step)
    losses = []
    for _ in range(25):
        state, loss = step(state, frozen, data)
        losses.append(float(loss))
    assert losses[-1] < 0.25 * losses[0], losses
    assert {p for p, x in leaf_paths(state.trainable) if x is not None} == {p for p, m in leaf_paths(mask) if m}


# ---------------------------------------------------------------------------------------------------------------
# Adapter files, merging, errors
# ---------------------------------------------------------------------------------------------------------------


def test_an_adapter_file_round_trips_and_refuses_another_base(tmp_path):
    module, params = tiny("gpt2")
    wrapped = prefix_wrap(params, module, CONFIG, jax.random.key(1), "prefix_layer")
    trained = lambda path, x: x + 0.5 if prefix.is_prefix_leaf(path) or path.startswith("score.") else x  # noqa: E731
    wrapped = map_with_path(trained, wrapped)  # what training changes differs from the fresh wrap and the base
    lora_config = LoraConfig(train_also=("score",))
    save_adapter(tmp_path / "adapter", wrapped, lora_config)
    loaded, config = load_adapter(tmp_path / "adapter", params)
    assert config == lora_config
    for (path, a), (_, b) in zip(leaf_paths(loaded), leaf_paths(wrapped), strict=True):
        if prefix.is_prefix_leaf(path) or path.startswith("score."):
            np.testing.assert_array_equal(a, b)
    assert special_counts(loaded) == CONFIG
    data = batch()
    np.testing.assert_allclose(forward(module, loaded, data)["logits"], forward(module, wrapped, data)["logits"])
    other_module, other = tiny("llama")
    with pytest.raises(LoraError, match="wrong base model"):
        load_adapter(tmp_path / "adapter", other)


def test_merge_and_merged_exports_refuse_prefix_leaves():
    module, params = tiny("bert")
    wrapped = prefix_wrap(params, module, CONFIG, jax.random.key(1), "prefix_embed")
    with pytest.raises(LoraError, match="cannot be merged"):
        lora.merge(wrapped)
    with pytest.raises(ValueError, match=r"use exports=\[adapter\]"):
        check_exports(("merged",), "prefix_layer")
    check_exports(("adapter",), "prefix_embed")


def test_errors_name_the_fix():
    module, params = tiny("bert")
    with pytest.raises(PrefixError, match="leave no room"):
        prefix_wrap(params, module, PrefixConfig(30, 10), jax.random.key(0))  # 40 positions
    with pytest.raises(PrefixError, match="at least one special token"):
        PrefixConfig(0, 0)
    with pytest.raises(PrefixError, match=">= 0"):
        PrefixConfig(-1, 2)
    with pytest.raises(PrefixError, match="method must be one of"):
        prefix_wrap(params, module, CONFIG, jax.random.key(0), "prefix_tuning")
    wrapped = prefix_wrap(params, module, CONFIG, jax.random.key(0))
    with pytest.raises(PrefixError, match="already carry prefix leaves"):
        prefix_wrap(wrapped, module, CONFIG, jax.random.key(0))
    t5_config = t5.Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
    t5_module = t5.build(t5_config, "seq2seq-lm")
    with pytest.raises(PrefixError, match="use method=lora"):
        prefix_wrap({}, t5_module, CONFIG, jax.random.key(0), "prefix_layer")


# ---------------------------------------------------------------------------------------------------------------
# Counting: the paper's formulas (Section 5.1), traced without allocating
# ---------------------------------------------------------------------------------------------------------------

GPT2_MEDIUM = dict(n_embd=1024, n_layer=24, n_head=16)
GPT2_LARGE = dict(n_embd=1280, n_layer=36, n_head=20)


@pytest.mark.parametrize(
    ("shape", "d_model", "layers", "l_p", "l_i"), [(GPT2_MEDIUM, 1024, 24, 256, 8), (GPT2_LARGE, 1280, 36, 8, 8)]
)
def test_counts_follow_the_papers_formulas(shape, d_model, layers, l_p, l_i):
    config = gpt2.Config(**shape)
    assert prefix_param_count(config, "causal-lm", l_p, l_i, "prefix_embed") == d_model * (l_p + l_i)
    assert prefix_param_count(config, "causal-lm", l_p, l_i, "prefix_layer") == layers * d_model * (l_p + l_i)


def test_counts_of_an_encoder_match_its_wrapped_params():
    module, params = tiny("deberta")
    wrapped = prefix_wrap(params, module, CONFIG, jax.random.key(0), "prefix_layer")
    counted = sum(int(np.size(x)) for p, x in leaf_paths(wrapped) if prefix.is_prefix_leaf(p))
    assert counted == prefix_param_count(module.config, "sequence-classification", 3, 2, "prefix_layer") == 3 * 32 * 5


# ---------------------------------------------------------------------------------------------------------------
# Token insertion (the data side)
# ---------------------------------------------------------------------------------------------------------------


def test_insertion_places_prefix_and_infix_and_keeps_padding_at_the_end():
    ids = np.array([[2, 10, 11, 3, 20, 3, 0], [2, 12, 3, 21, 22, 23, 3]], np.int32)
    mask = (ids != 0).astype(np.int32)
    types = np.array([[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1]], np.int32)
    out = insert_special(
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": np.array([1, 0])},
        np.array([1, 1]), np.array([3, 2]), TOKENS, pad_id=0,
    )  # fmt: skip
    np.testing.assert_array_equal(out["input_ids"][0], [2, 60, 61, 62, 10, 11, 63, 64, 3, 20, 3, 0])
    np.testing.assert_array_equal(out["input_ids"][1], [2, 60, 61, 62, 12, 63, 64, 3, 21, 22, 23, 3])
    np.testing.assert_array_equal(out["attention_mask"].sum(1), mask.sum(1) + 5)
    np.testing.assert_array_equal(out["token_type_ids"][0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(out["labels"], [1, 0])


def test_causal_rows_get_the_infix_after_the_prompt():
    """E2E layout: P MR eos I reference eos, the loss mask still on the reference and its eos only."""
    ids = np.array([[5, 6, 1, 7, 8, 1, 0], [5, 1, 9, 1, 0, 0, 0]], np.int32)
    mask = (np.arange(7)[None] < np.array([[6], [4]])).astype(np.int32)
    loss = np.array([[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0]], np.int32)
    out = insert_special_causal({"input_ids": ids, "attention_mask": mask, "loss_mask": loss}, TOKENS, pad_id=0)
    np.testing.assert_array_equal(out["input_ids"][0], [60, 61, 62, 5, 6, 1, 63, 64, 7, 8, 1, 0])
    np.testing.assert_array_equal(out["loss_mask"][0], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(out["input_ids"][1], [60, 61, 62, 5, 1, 63, 64, 9, 1, 0, 0, 0])
    prompts = insert_special_causal({"input_ids": ids[:, :3], "attention_mask": np.ones((2, 3), np.int32)}, TOKENS, 0)
    np.testing.assert_array_equal(prompts["input_ids"][0], [60, 61, 62, 5, 6, 1, 63, 64])
