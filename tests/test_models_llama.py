"""Llama / Qwen2 / Mistral against transformers' torch models on random tiny configs: logits, checkpoint round
trips, LoRA target names, cached decoding, PEFT adapters both ways, refused configs."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lora_jax.adapters_peft import load_peft_adapter, save_peft_adapter
from lora_jax.lora import LoraConfig, lora_wrap
from lora_jax.models import hub, llama, spec
from lora_jax.tree import leaf_paths
from tests.test_lora import perturb_lora_b

peft = pytest.importorskip("peft")

VOCAB, PAD = 97, 0
TOL = 1e-4
# initializer_range 0.2 (not 0.02) makes attention peaked, so a wrong mask, position or head grouping shows.
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, initializer_range=0.2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
VARIANTS = {  # name: (config class, extra config)
    "llama-gqa-untied-llama3": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=2, rope_scaling={**LLAMA3, "original_max_position_embeddings": 16}),
    ),
    "llama-mha-tied-linear": (
        transformers.LlamaConfig,
        dict(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=500.0),
    ),
    "llama-gqa1-bias": (transformers.LlamaConfig, dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    "qwen2-gqa-bias": (transformers.Qwen2Config, dict(num_key_value_heads=2, rope_theta=1e6)),
    "mistral-gqa": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=None, head_dim=16)),
}
CLASSES = {
    "base": transformers.AutoModel,
    "causal-lm": transformers.AutoModelForCausalLM,
    "sequence-classification": transformers.AutoModelForSequenceClassification,
}
LENGTHS = (9, 6, 3)


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Random norm scales and biases too, so a swapped or dropped leaf cannot hide behind 1s and 0s."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                centre = 1.0 if "norm" in name else 0.0
                p.copy_(centre + 0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def hf_config(variant: str, **kw) -> transformers.PretrainedConfig:
    cls, extra = VARIANTS[variant]
    return cls(**{**TINY, **extra, **kw}, num_labels=3)


@functools.cache
def hf_model(variant: str, task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return _randomise(CLASSES[task].from_config(hf_config(variant)))


@functools.cache
def _saved(variant: str, task: str, root: str) -> str:
    folder = f"{root}/{variant}-{task}"
    hf_model(variant, task).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("llama"))
    return lambda variant, task: _saved(variant, task, root)


def batch(left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Three rows of lengths LENGTHS, padded with PAD on the right (or the left)."""
    ids = np.random.RandomState(0).randint(3, VOCAB, (len(LENGTHS), max(LENGTHS)))
    mask = (np.arange(max(LENGTHS))[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
    if left:
        mask = mask[:, ::-1].copy()
    return np.where(mask == 1, ids, PAD), mask


def torch_out(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))


def flax_out(module, params, ids, mask):
    return module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification"])
def test_outputs_match_transformers(folder, variant, task):
    module, params, _, config = hub.from_pretrained(folder(variant, task), task=task)
    model = hf_model(variant, task)
    for left in (False, True):
        ids, mask = batch(left)
        ours, theirs = flax_out(module, params, ids, mask)["logits"], torch_out(model, ids, mask).logits.numpy()
        if task == "causal-lm":  # padded positions' logits are garbage in both
            ours, theirs = ours * mask[..., None], theirs * mask[..., None]
        assert np.abs(np.asarray(ours) - theirs).max() <= TOL, (variant, left)
    assert config.num_key_value_heads == model.config.num_key_value_heads


def test_base_model_matches_and_round_trips(folder, tmp_path):
    variant = "llama-gqa-untied-llama3"
    module, params, _, config = hub.from_pretrained(folder(variant, "base"), task="base")
    ids, mask = batch()
    real = mask.astype(bool)
    ours = np.asarray(flax_out(module, params, ids, mask)["last_hidden_state"])[real]
    assert np.abs(ours - torch_out(hf_model(variant, "base"), ids, mask).last_hidden_state.numpy()[real]).max() <= TOL
    hub.to_pretrained(module, params, tmp_path / "out", "base")
    again = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    assert np.abs(ours - torch_out(again, ids, mask).last_hidden_state.numpy()[real]).max() <= TOL


@pytest.mark.parametrize("variant", ["llama-mha-tied-linear", "qwen2-gqa-bias"])
def test_causal_lm_round_trips_through_transformers(folder, tmp_path, variant):
    module, params, _, config = hub.from_pretrained(folder(variant, "causal-lm"), task="causal-lm")
    hub.to_pretrained(module, params, tmp_path / "out", "causal-lm")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == variant.split("-")[0]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = batch()
    theirs, ref = torch_out(again, ids, mask).logits.numpy(), torch_out(hf_model(variant, "causal-lm"), ids, mask)
    assert np.abs((theirs - ref.logits.numpy()) * mask[..., None]).max() <= TOL
    reloaded = spec.config_from_hf(written, "causal-lm")
    assert dataclasses.replace(reloaded, dtype=config.dtype, param_dtype=config.param_dtype) == config


def test_a_new_classifier_head_is_initialised_and_named(folder):
    state = hub.load_state(Path(folder("qwen2-gqa-bias", "causal-lm")))
    config = spec.config_from_hf(hf_config("qwen2-gqa-bias").to_dict(), "sequence-classification", num_labels=5)
    loaded, fresh = spec.params_from_hf(state, config, "sequence-classification")
    assert fresh == ["score.kernel"] and loaded["score"]["kernel"].shape == (32, 5)
    assert "lm_head" not in loaded


@pytest.mark.parametrize("name", ["q", "k", "v", "o", "mlp", "all-linear"])
def test_every_paper_target_name_matches_its_kernels(folder, name):
    _, params, _, _ = hub.from_pretrained(folder("llama-gqa-untied-llama3", "causal-lm"), task="causal-lm")
    config = hub.lora_config("llama", [name], r=2)
    adapted = {p.removesuffix(".lora_a") for p, _ in leaf_paths(lora_wrap(params, config, jax.random.key(0)))}
    adapted = {p for p in adapted if p.endswith("_proj")}
    attention = [f"self_attn.{n}_proj" for n in "qkvo"]
    expected = {
        "q": ["self_attn.q_proj"],
        "k": ["self_attn.k_proj"],
        "v": ["self_attn.v_proj"],
        "o": ["self_attn.o_proj"],
        "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
        "all-linear": [*attention, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],  # never lm_head
    }[name]
    assert adapted == {f"model.layers.{i}.{m}" for i in range(2) for m in expected}


@functools.cache
def _tiny_lm(variant: str = "llama-gqa-untied-llama3"):
    config = spec.config_from_hf(hf_config(variant).to_dict(), "causal-lm")
    module = llama.build(config, "causal-lm")
    ids = jax.random.randint(jax.random.key(1), (2, 7), 3, VOCAB)
    return config, module, jax.jit(module.init)(jax.random.key(0), ids)["params"], ids


def test_cached_decoding_matches_the_full_forward():
    config, module, params, ids = _tiny_lm()
    ones = jnp.ones((2, 7), jnp.int32)
    full = module.apply({"params": params}, ids)["logits"]
    run = jax.jit(lambda x, cache, index: module.apply({"params": params}, x, ones, cache=cache, cache_index=index))
    out = run(ids[:, :4], llama.init_cache(config, 2, 7), 0)
    # grouped-query attention caches the kv heads only
    assert out["cache"][0]["k"].shape == (2, config.num_key_value_heads, 7, config.head_dim)
    steps = [out["logits"]]
    for t in range(4, 7):
        out = run(ids[:, t : t + 1], out["cache"], t)
        steps.append(out["logits"])
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def test_remat_and_bf16_keep_outputs():
    config, module, params, ids = _tiny_lm()
    remat = llama.build(dataclasses.replace(config, remat=True), "causal-lm")
    grad = lambda m: jax.jit(jax.grad(lambda p: m.apply({"params": p}, ids)["logits"].std()))(params)
    g, g_remat = grad(module), grad(remat)
    assert np.abs(np.asarray(g["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"])).max() > 0
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), g, g_remat)
    bf16 = llama.build(dataclasses.replace(config, dtype="bfloat16"), "causal-lm")
    out, ref = bf16.apply({"params": params}, ids)["logits"], module.apply({"params": params}, ids)["logits"]
    assert out.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification"])
def test_lora_jax_adapter_loads_in_peft(folder, tmp_path, task):
    variant = "llama-gqa-untied-llama3"
    module, params, _, _ = hub.from_pretrained(folder(variant, task), task=task)
    targets = ["q", "v"] if task == "causal-lm" else ["all-linear"]
    train_also = ("score",) if task == "sequence-classification" else ()
    config = hub.lora_config("llama", targets, r=4, alpha=8.0, train_also=train_also)
    params = perturb_lora_b(lora_wrap(params, config, jax.random.key(0)))
    if train_also:
        params["score"]["kernel"] = params["score"]["kernel"] + 0.3
    save_peft_adapter(tmp_path / "adapter", params, config, "llama", task, folder(variant, task))
    base = CLASSES[task].from_pretrained(folder(variant, task)).eval()
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids, mask = batch()
    ours, theirs = np.asarray(flax_out(module, params, ids, mask)["logits"]), torch_out(model, ids, mask).logits.numpy()
    plain = torch_out(hf_model(variant, task), ids, mask).logits.numpy()
    if task == "causal-lm":
        ours, theirs, plain = (x * mask[..., None] for x in (ours, theirs, plain))
    assert np.abs(ours - plain).max() > 1e-2  # the adapter changes the outputs...
    assert np.abs(ours - theirs).max() <= TOL  # ...and PEFT applies it exactly as lora_jax does


def test_peft_made_adapter_loads_in_lora_jax(folder, tmp_path):
    variant = "qwen2-gqa-bias"
    base = hf_model(variant, "causal-lm")
    torch.manual_seed(3)
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(CLASSES["causal-lm"].from_pretrained(folder(variant, "causal-lm")), peft_config).eval()
    model.save_pretrained(tmp_path / "adapter")
    module, params, _, _ = hub.from_pretrained(folder(variant, "causal-lm"), task="causal-lm")
    adapted, lora_config = load_peft_adapter(tmp_path / "adapter", params, "qwen2")
    assert isinstance(lora_config, LoraConfig) and lora_config.r == 4
    ids, mask = batch()
    ours = np.asarray(flax_out(module, adapted, ids, mask)["logits"]) * mask[..., None]
    theirs = torch_out(model, ids, mask).logits.numpy() * mask[..., None]
    plain = torch_out(base, ids, mask).logits.numpy() * mask[..., None]
    assert np.abs(ours - plain).max() > 1e-2
    assert np.abs(ours - theirs).max() <= TOL


def test_bad_input_is_refused_with_a_fix():
    good = hf_config("llama-gqa-untied-llama3").to_dict()
    with pytest.raises(ValueError, match="sliding_window to null"):
        spec.config_from_hf(hf_config("mistral-gqa", sliding_window=8).to_dict(), "causal-lm")
    with pytest.raises(ValueError, match="use_sliding_window"):
        spec.config_from_hf({**hf_config("qwen2-gqa-bias").to_dict(), "use_sliding_window": True}, "causal-lm")
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        spec.config_from_hf({**good, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "causal-lm")
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        spec.config_from_hf({**good, "num_key_value_heads": 3}, "causal-lm")
    with pytest.raises(ValueError, match="no task"):
        llama.build(spec.config_from_hf(good, "base"), "token-classification")
    config, module, params, ids = _tiny_lm()
    with pytest.raises(ValueError, match="token types"):
        module.apply({"params": params}, ids, token_type_ids=jnp.zeros_like(ids))
    with pytest.raises(ValueError, match="merge"):
        spec.params_to_hf(lora_wrap(params, hub.lora_config("llama", ["q"]), jax.random.key(0)), config, "causal-lm")
    state = spec.params_to_hf(params, config, "causal-lm")
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        spec.params_from_hf(state, config, "causal-lm")
    state["model.layers.1.mlp.up_proj.weight"] = np.zeros((5, 32), np.float32)
    with pytest.raises(ValueError, match=r"has shape \(32, 5\)"):
        spec.params_from_hf(state, config, "causal-lm")
