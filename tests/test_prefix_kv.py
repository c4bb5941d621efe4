"""method=prefix_kv, PEFT's prefix tuning (lora_jax.prefix): against PEFT's PrefixTuning on transformers' torch
models (BERT, RoBERTa, GPT-2, Llama with grouped KV heads), its init, cached decoding, what trains, and refusals."""

from __future__ import annotations

import functools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lora_jax.adapters import load_adapter, save_adapter
from lora_jax.lora import LoraConfig, LoraError, merge
from lora_jax.methods import trainable_mask
from lora_jax.models import gpt2, hub, llama
from lora_jax.prefix import (
    KV_LEAVES,
    PREFIX_KEY,
    PrefixConfig,
    PrefixError,
    kv_prefix_length,
    prefix_param_count,
    prefix_wrap,
    special_counts,
)
from lora_jax.tree import filter_leaves, leaf_paths, map_with_path
from tests.test_prefix import tiny

peft = pytest.importorskip("peft")

VOCAB, L_P = 61, 3
SMALL = dict(vocab_size=VOCAB, initializer_range=0.2)
CASES = {  # name: (transformers config, our task, PEFT task type)
    "bert": (transformers.BertConfig(**SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=40, num_labels=3),
             "sequence-classification", "SEQ_CLS"),
    "roberta": (transformers.RobertaConfig(**SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=48, max_position_embeddings=44, pad_token_id=1,
                                           num_labels=3),
                "sequence-classification", "SEQ_CLS"),
    "gpt2": (transformers.GPT2Config(**SMALL, n_positions=40, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                     eos_token_id=0),
             "causal-lm", "CAUSAL_LM"),
    "llama": (transformers.LlamaConfig(**SMALL, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2),
              "causal-lm", "CAUSAL_LM"),
}  # fmt: skip
MODULES = {"gpt2": gpt2, "llama": llama}
CLASSES = {"sequence-classification": transformers.AutoModelForSequenceClassification,
           "causal-lm": transformers.AutoModelForCausalLM}  # fmt: skip


def batch() -> tuple[np.ndarray, np.ndarray]:
    """Two right-padded rows (lengths 7 and 4) of ids 3.. (never RoBERTa's pad id 1)."""
    ids = np.random.RandomState(0).randint(3, VOCAB, (2, 7))
    mask = (np.arange(7)[None, :] < np.array([[7], [4]])).astype(np.int64)
    return np.where(mask == 1, ids, 1), mask


@functools.cache
def _peft_pair(name: str, folder: str):
    """(our module, our params holding PEFT's prefix, PEFT's model) for one case, the base saved in `folder`."""
    config, task, task_type = CASES[name]
    torch.manual_seed(0)
    model = CLASSES[task].from_config(config).eval()
    model.save_pretrained(folder)
    module, params, _, _ = hub.from_pretrained(folder, task=task)
    wrapped = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=L_P)).eval()
    table = wrapped.prompt_encoder.default.embedding.weight.detach().numpy()  # (l_p, layers * 2 * kv_dim)
    per_layer = table.reshape(L_P, -1, 2, table.shape[1] // (2 * config.num_hidden_layers))  # (l_p, L, k|v, kv_dim)
    ours = prefix_wrap(params, module, PrefixConfig(L_P, 0), jax.random.key(0), "prefix_kv")

    def peft_rows(path: str, leaf):
        if path.rsplit(".", 1)[-1] not in KV_LEAVES:
            return leaf
        layer = int(re.search(r"\.(\d+)\.", path).group(1))
        return jnp.asarray(per_layer[:, layer, KV_LEAVES.index(path.rsplit(".", 1)[-1])])

    return module, map_with_path(peft_rows, ours), wrapped


@pytest.mark.parametrize("name", CASES)
def test_outputs_match_peft_prefix_tuning(tmp_path_factory, name):
    module, params, theirs = _peft_pair(name, str(tmp_path_factory.mktemp(name)))
    ids, mask = batch()
    ours = np.asarray(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))["logits"])
    with torch.no_grad():
        expected = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    if CASES[name][1] == "causal-lm":  # padded positions' logits are garbage in both
        ours, expected = ours * mask[..., None], expected * mask[..., None]
    assert np.abs(ours - expected).max() <= 1e-4
    # ...and the prefix matters: without it the logits are another model's
    plain = filter_leaves(params, lambda path: path.rsplit(".", 1)[-1] not in KV_LEAVES)
    base = np.asarray(module.apply({"params": plain}, jnp.asarray(ids), jnp.asarray(mask))["logits"])
    if CASES[name][1] == "causal-lm":
        base = base * mask[..., None]
    assert np.abs(base - expected).max() > 1e-2


def test_leaves_and_count_follow_peft_layout():
    """2 L kv_dim l_p: GQA's keys and values are kv_heads * head_dim wide, as PEFT's token_dim for such models."""
    module, params = tiny("llama")  # 3 layers, 4 heads of 8, 2 KV heads
    wrapped = prefix_wrap(params, module, PrefixConfig(5, 0), jax.random.key(0), "prefix_kv")
    added = {p: np.shape(x) for p, x in leaf_paths(wrapped) if p.rsplit(".", 1)[-1] in KV_LEAVES}
    assert len(added) == 2 * 3 and set(added.values()) == {(5, 2 * 8)}
    assert all(".self_attn." in p for p in added)
    assert prefix_param_count(module.config, "sequence-classification", 5, 0, "prefix_kv") == 2 * 3 * 16 * 5
    assert special_counts(wrapped) == PrefixConfig(5, 0) and kv_prefix_length(wrapped) == 5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_causal_model_starts_as_the_pretrained_one_reading_the_drawn_tokens(family):
    """Each attention's prefix starts as the keys and values of drawn vocabulary tokens at positions 0..l_p-1 and
    the text's positions count on from l_p, so the logits at the text are the base model's on [drawn, text]."""
    module, params = tiny(family, "causal-lm")
    wrapped = prefix_wrap(params, module, PrefixConfig(L_P, 0), jax.random.key(4), "prefix_kv")
    key = jax.random.fold_in(jax.random.key(4), zlib.crc32(b"prefix_tokens"))
    drawn = jax.random.randint(key, (L_P,), 0, 60)  # the tiny models' vocabulary
    text = jnp.asarray(np.random.RandomState(1).randint(3, 60, (1, 6)))
    ours = module.apply({"params": wrapped}, text)["logits"]
    reading = module.apply({"params": params}, jnp.concatenate([drawn[None, :], text], axis=1))["logits"]
    np.testing.assert_allclose(ours, reading[:, L_P:], atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_decoding_sees_the_prefix(family):
    """Prefill, then one token at a time through the KV cache, equals the full forward with the prefix."""
    module, params = tiny(family, "causal-lm")
    wrapped = prefix_wrap(params, module, PrefixConfig(L_P, 0), jax.random.key(2), "prefix_kv")
    ids = jnp.asarray(np.random.RandomState(2).randint(3, 60, (2, 8)))
    ones = jnp.ones_like(ids)
    full = module.apply({"params": wrapped}, ids, ones)["logits"]
    run = jax.jit(lambda x, cache, t: module.apply({"params": wrapped}, x, ones, cache=cache, cache_index=t))
    out = run(ids[:, :6], MODULES[family].init_cache(module.config, 2, 8), 0)
    steps = [out["logits"]]
    for t in (6, 7):
        out = run(ids[:, t : t + 1], out["cache"], t)
        steps.append(out["logits"])
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_only_the_prefix_and_the_head_train_and_an_adapter_round_trips(tmp_path):
    module, params = tiny("bert")
    wrapped = prefix_wrap(params, module, PrefixConfig(L_P, 0), jax.random.key(0), "prefix_kv")
    config = LoraConfig(train_also=("classifier",))
    trains = {p for p, t in leaf_paths(trainable_mask(wrapped, config, "prefix_kv")) if t}
    assert trains and all(p.rsplit(".", 1)[-1] in KV_LEAVES or p.startswith("classifier.") for p in trains)
    assert sum(p.endswith(PREFIX_KEY) for p in trains) == 3
    moved = map_with_path(lambda p, x: x + 1.0 if p.rsplit(".", 1)[-1] in KV_LEAVES else x, wrapped)
    save_adapter(tmp_path / "adapter", moved, config, method="prefix_kv")
    loaded, _ = load_adapter(tmp_path / "adapter", params)
    ids = jnp.asarray(batch()[0])
    np.testing.assert_allclose(module.apply({"params": loaded}, ids)["logits"],
                               module.apply({"params": moved}, ids)["logits"], atol=1e-6)  # fmt: skip
    with pytest.raises(LoraError, match="cannot be merged"):
        merge(moved)


@pytest.mark.parametrize("family", ["distilbert", "deberta"])
def test_families_without_it_and_infix_tokens_are_refused_in_one_line(family):
    module, params = tiny(family)
    with pytest.raises(PrefixError, match="offered for BERT/RoBERTa, GPT-2 and Llama.*use method=lora"):
        prefix_wrap(params, module, PrefixConfig(L_P, 0), jax.random.key(0), "prefix_kv")
    module, params = tiny("gpt2")
    with pytest.raises(PrefixError, match="set prefix.l_i=0"):
        prefix_wrap(params, module, PrefixConfig(L_P, 2), jax.random.key(0), "prefix_kv")


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_text_past_the_position_table_is_refused_with_the_prefix_counted(family):
    """40 learned positions: 37 text tokens fit after a 3-token prefix, 38 do not (a lookup past the table would
    read NaN); the plain model still takes 40."""
    module, params = tiny(family, "causal-lm" if family == "gpt2" else "sequence-classification")
    wrapped = prefix_wrap(params, module, PrefixConfig(L_P, 0), jax.random.key(0), "prefix_kv")
    run = lambda p, n: module.apply({"params": p}, jnp.full((1, n), 5, jnp.int32))["logits"]  # noqa: E731
    assert np.isfinite(run(wrapped, 37)).all() and np.isfinite(run(params, 40)).all()
    with pytest.raises(ValueError, match="38 tokens after a 3-token key/value prefix need 41 positions, more than"):
        run(wrapped, 38)
    with pytest.raises(ValueError, match="41 tokens need 41 positions.*shorten the input"):
        run(params, 41)
