"""GPT-2 against transformers' torch GPT-2: outputs, checkpoint round trips, slice LoRA, greedy decoding."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from lora_jax.lora import LoraConfig, lora_wrap, merge
from lora_jax.models import gpt2, hub
from lora_jax.models.spec import config_from_hf, config_to_hf, params_from_hf, params_to_hf
from lora_jax.tree import leaf_paths
from tests.test_lora import perturb_lora_b

VOCAB, PAD, EOS = 97, 0, 2
# initializer_range 0.2 (not 0.02) makes attention peaked, so a wrong mask or position shows in the outputs.
TINY = dict(
    vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
    bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD,
)  # fmt: skip
HF_CLASSES = {
    "base": transformers.GPT2Model,
    "causal-lm": transformers.GPT2LMHeadModel,
    "sequence-classification": transformers.GPT2ForSequenceClassification,
}
LENGTHS = (9, 6, 3)  # per row; right-padded to 9 with PAD


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Random LayerNorm scales and biases too, so a swapped or dropped leaf cannot hide behind 1s and 0s."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # a 1-D weight is a LayerNorm scale
                centre = 1.0 if name.endswith("weight") else 0.0
                p.copy_(centre + 0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{task: (folder, torch model)} of random tiny GPT-2s saved with save_pretrained."""
    out = {}
    for i, (task, cls) in enumerate(HF_CLASSES.items()):
        torch.manual_seed(i)
        model = _randomise(cls(transformers.GPT2Config(**TINY, num_labels=3)))
        folder = tmp_path_factory.mktemp(task)
        model.save_pretrained(folder)
        out[task] = (folder, model)
    return out


def _batch():
    ids = np.random.RandomState(0).randint(3, VOCAB, (len(LENGTHS), max(LENGTHS)))
    mask = (np.arange(max(LENGTHS))[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, PAD), mask


def _torch(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))


def _load(folder, task):
    config = config_from_hf(json.loads((folder / "config.json").read_text()), task)
    params, new = params_from_hf(load_file(folder / "model.safetensors"), config, task)
    return gpt2.build(config, task), params, config, new


def _apply(module, params, ids, mask, **kw):
    return module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), **kw)


@pytest.mark.parametrize("task", ["base", "causal-lm"])
def test_hidden_states_and_lm_logits_match_transformers(checkpoints, task):
    folder, model = checkpoints[task]
    module, params, _, new = _load(folder, task)
    assert new == []
    ids, mask = _batch()
    ref, out = _torch(model, ids, mask), _apply(module, params, ids, mask)
    real = mask.astype(bool)
    ref_hidden = (
        ref.last_hidden_state if task == "base" else _torch(model.transformer, ids, mask).last_hidden_state
    )
    hidden_diff = np.abs(np.asarray(out["last_hidden_state"])[real] - ref_hidden.numpy()[real]).max()
    print(f"{task}: hidden max abs diff {hidden_diff:.2e}")
    assert hidden_diff <= 1e-4
    if task == "causal-lm":
        logits, ref_logits = np.asarray(out["logits"]), ref.logits.numpy()
        last = np.array(LENGTHS) - 1
        rows = np.arange(len(LENGTHS))
        lm_diff = np.abs(logits[real] - ref_logits[real]).max()
        next_diff = np.abs(logits[rows, last] - ref_logits[rows, last]).max()
        print(f"LM logits max abs diff {lm_diff:.2e}, next-token logits {next_diff:.2e}")
        assert lm_diff <= 1e-4 and next_diff <= 1e-4
        assert (logits[rows, last].argmax(-1) == ref_logits[rows, last].argmax(-1)).all()


def test_rarer_config_options_match_transformers(tmp_path):
    variant = dict(
        TINY, scale_attn_by_inverse_layer_idx=True, scale_attn_weights=False, activation_function="relu",
        n_inner=48, layer_norm_epsilon=1e-3,
    )  # fmt: skip
    torch.manual_seed(5)
    model = _randomise(transformers.GPT2Model(transformers.GPT2Config(**variant)))
    model.save_pretrained(tmp_path)
    module, params, config, _ = _load(tmp_path, "base")
    assert (config.n_inner, config.activation_function, config.scale_attn_weights) == (48, "relu", False)
    ids, mask = _batch()
    real = mask.astype(bool)
    ours = np.asarray(_apply(module, params, ids, mask)["last_hidden_state"])[real]
    diff = np.abs(ours - _torch(model, ids, mask).last_hidden_state.numpy()[real]).max()
    print(f"variant config hidden max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_sequence_classification_pools_the_last_real_token_like_transformers(checkpoints):
    folder, model = checkpoints["sequence-classification"]
    module, params, config, new = _load(folder, "sequence-classification")
    assert new == [] and config.num_labels == 3
    ids, mask = _batch()
    ref, out = (
        _torch(model, ids, mask).logits.numpy(),
        np.asarray(_apply(module, params, ids, mask)["logits"]),
    )
    print(f"sequence-classification logits max abs diff {np.abs(out - ref).max():.2e}")
    assert out.shape == (len(LENGTHS), 3)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # Pooling the final position (a pad for rows 1 and 2) would have given other logits.
    hidden = _apply(module, params, ids, mask)["last_hidden_state"][:, -1]
    at_final = np.asarray(hidden @ params["score"]["kernel"])
    np.testing.assert_allclose(at_final[0], out[0], atol=1e-5)
    assert np.abs(at_final[1:] - out[1:]).max() > 1e-2


def test_base_checkpoint_gets_a_fresh_score_head(checkpoints):
    folder, _ = checkpoints["base"]
    module, params, _, new = _load(folder, "sequence-classification")
    assert new == ["score.kernel"]
    assert params["score"]["kernel"].shape == (32, 3)
    assert np.asarray(_apply(module, params, *_batch())["logits"]).shape == (3, 3)


@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification"])
def test_params_to_hf_loads_into_a_fresh_torch_model_with_identical_outputs(checkpoints, task):
    folder, model = checkpoints[task]
    _, params, config, _ = _load(folder, task)
    state = params_to_hf(params, config, task)
    torch.manual_seed(123)
    fresh = HF_CLASSES[task](transformers.GPT2Config(**TINY, num_labels=3)).eval()
    assert set(state) == set(fresh.state_dict())
    fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    ids, mask = _batch()
    a, b = _torch(model, ids, mask).logits.numpy(), _torch(fresh, ids, mask).logits.numpy()
    np.testing.assert_array_equal(a, b)


def test_config_round_trips_through_transformers():
    config = gpt2.Config(**{k: v for k, v in TINY.items()}, num_labels=5, n_inner=48)
    for task in gpt2.SPEC.tasks:
        hf = transformers.GPT2Config.from_dict(config_to_hf(config, task))
        assert hf.num_labels == 5 and hf.n_inner == 48 and hf.architectures == [gpt2.ARCHITECTURES[task]]
        assert config_from_hf(hf.to_dict(), task) == config


def test_hub_from_pretrained_and_to_pretrained(checkpoints, tmp_path):
    folder, model = checkpoints["causal-lm"]
    module, params, _, config = hub.from_pretrained(folder, task="causal-lm")
    ids, mask = _batch()
    real = mask.astype(bool)
    logits = np.asarray(_apply(module, params, ids, mask)["logits"])
    assert np.abs(logits[real] - _torch(model, ids, mask).logits.numpy()[real]).max() <= 1e-4
    hub.to_pretrained(module, params, tmp_path / "out", "causal-lm")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(reloaded, transformers.GPT2LMHeadModel)
    np.testing.assert_array_equal(
        _torch(reloaded, ids, mask).logits.numpy(), _torch(model, ids, mask).logits.numpy()
    )


def test_lora_on_q_and_v_slices_merges_exactly_and_leaves_k_alone(checkpoints):
    module, params, _, _ = _load(checkpoints["causal-lm"][0], "causal-lm")
    config = LoraConfig(
        r=4, alpha=8, targets=(gpt2.LORA_TARGETS["q"], gpt2.LORA_TARGETS["v"]), fused=gpt2.FUSED
    )
    wrapped = perturb_lora_b(lora_wrap(params, config, jax.random.key(0)))
    lora_leaves = sorted(p for p, _ in leaf_paths(wrapped) if ".lora_" in p)
    expected = sorted(
        f"transformer.h.{i}.attn.c_attn.lora_{kind}_{s}"
        for i in range(2)
        for kind in ("a", "b", "scale", "slice")
        for s in ("q", "v")
    )
    assert lora_leaves == expected
    ids, mask = _batch()
    real = mask.astype(bool)
    unmerged = np.asarray(_apply(module, wrapped, ids, mask)["logits"])[real]
    merged_params = merge(wrapped)
    merged = np.asarray(_apply(module, merged_params, ids, mask)["logits"])[real]
    base = np.asarray(_apply(module, params, ids, mask)["logits"])[real]
    print(f"LoRA merged vs unmerged max abs diff {np.abs(merged - unmerged).max():.2e}")
    assert np.abs(merged - unmerged).max() <= 1e-5
    assert np.abs(unmerged - base).max() > 1e-2  # the adapters did something
    for i in range(2):
        before = np.asarray(params["transformer"]["h"][str(i)]["attn"]["c_attn"]["kernel"])
        after = np.asarray(merged_params["transformer"]["h"][str(i)]["attn"]["c_attn"]["kernel"])
        q, k, v = (slice(j * 32, (j + 1) * 32) for j in range(3))
        np.testing.assert_array_equal(after[:, k], before[:, k])
        assert np.abs(after[:, q] - before[:, q]).max() > 0 and np.abs(after[:, v] - before[:, v]).max() > 0


@pytest.mark.parametrize("name", ["k", "o", "mlp"])
def test_every_paper_target_name_matches_its_kernels(name):
    _, _, params, _ = _tiny_lm()
    config = LoraConfig(r=2, targets=(gpt2.LORA_TARGETS[name],), fused=gpt2.FUSED)
    wrapped = lora_wrap(params, config, jax.random.key(0))
    # module path + slice suffix of every adapter, e.g. transformer.h.0.attn.c_attn_k
    adapted = {p.replace(".lora_a", "") for p, _ in leaf_paths(wrapped) if ".lora_a" in p}
    expected = {
        "k": {"attn.c_attn_k"},
        "o": {"attn.c_proj"},
        "mlp": {"mlp.c_fc", "mlp.c_proj"},
    }[name]
    assert adapted == {f"transformer.h.{i}.{m}" for i in range(2) for m in expected}


def test_greedy_generate_matches_transformers_generate(checkpoints):
    _, model = checkpoints["causal-lm"]
    module, params, _, _ = _load(checkpoints["causal-lm"][0], "causal-lm")
    ids, mask = _batch()
    left_ids = np.stack([np.roll(r, max(LENGTHS) - n) for r, n in zip(ids, LENGTHS, strict=True)])
    left_mask = np.stack([np.roll(r, max(LENGTHS) - n) for r, n in zip(mask, LENGTHS, strict=True)])

    def hf_generate(eos):
        with torch.no_grad():
            out = model.generate(
                torch.tensor(left_ids), attention_mask=torch.tensor(left_mask), max_new_tokens=8,
                do_sample=False, eos_token_id=eos, pad_token_id=PAD,
            )  # fmt: skip
        return out[:, left_ids.shape[1] :].numpy()

    # Without an eos every row runs the full length; pick as eos a token row 0 first emits mid-way.
    free = hf_generate(None)
    stop = next(j for j in range(1, 8) if free[0, j] not in free[0, :j])
    eos = int(free[0, stop])
    ref = hf_generate(eos)
    assert ref.shape[1] > stop + 1  # another row went on: padding after eos is exercised
    # Right-padded prompts: generate moves the padding left itself.
    ours = gpt2.generate(module, params, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=PAD)
    ours = np.asarray(ours)
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1] :] == PAD).all()
    assert ours[0, stop] == eos and (ours[0, stop + 1 :] == PAD).all()
    np.testing.assert_array_equal(ours[0, :stop], free[0, :stop])


@functools.cache
def _tiny_lm():
    """A random-init model straight from Flax (jit: an eager init costs seconds of per-op dispatch)."""
    config = gpt2.Config(**TINY)
    module = gpt2.build(config, "causal-lm")
    ids = jax.random.randint(jax.random.key(1), (2, 7), 3, VOCAB)
    return config, module, jax.jit(module.init)(jax.random.key(0), ids)["params"], ids


def test_cached_decoding_matches_the_full_forward():
    config, module, params, ids = _tiny_lm()
    ones = jnp.ones((2, 7), jnp.int32)
    full = module.apply({"params": params}, ids)["logits"]
    run = jax.jit(
        lambda x, cache, index: module.apply({"params": params}, x, ones, cache=cache, cache_index=index)
    )
    out = run(ids[:, :4], gpt2.init_cache(config, 2, 7), 0)
    steps = [out["logits"]]
    for t in range(4, 7):
        out = run(ids[:, t : t + 1], out["cache"], t)
        steps.append(out["logits"])
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def test_dropout_is_active_only_when_not_deterministic():
    _, module, params, ids = _tiny_lm()
    train = jax.jit(
        lambda key: module.apply({"params": params}, ids, deterministic=False, rngs={"dropout": key})
    )
    a, b = train(jax.random.key(0))["logits"], train(jax.random.key(1))["logits"]
    assert np.abs(a - b).max() > 1e-3
    assert np.abs(a - module.apply({"params": params}, ids)["logits"]).max() > 1e-3
    np.testing.assert_array_equal(a, train(jax.random.key(0))["logits"])


def test_remat_changes_neither_outputs_nor_gradients():
    config, module, params, ids = _tiny_lm()
    remat = gpt2.build(dataclasses.replace(config, remat=True), "causal-lm")
    grad = lambda m: jax.jit(jax.grad(lambda p: m.apply({"params": p}, ids)["logits"].std()))(params)
    g, g_remat = grad(module), grad(remat)
    assert np.abs(np.asarray(g["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"])).max() > 0
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), g, g_remat)


def test_bfloat16_compute_keeps_float32_params():
    config, module, params, ids = _tiny_lm()
    bf16 = gpt2.build(dataclasses.replace(config, dtype="bfloat16"), "causal-lm")
    assert (
        jax.eval_shape(bf16.init, jax.random.key(0), ids)["params"]["transformer"]["wte"]["embedding"].dtype
        == jnp.float32
    )
    out, ref = bf16.apply({"params": params}, ids)["logits"], module.apply({"params": params}, ids)["logits"]
    assert out.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.05 * np.abs(ref).max()


def test_bad_input_is_refused_with_a_fix():
    config = gpt2.Config(**TINY)
    with pytest.raises(ValueError, match="no task"):
        gpt2.build(config, "token-classification")
    with pytest.raises(ValueError, match="not divisible"):
        gpt2.Config(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="exceeds n_positions"):
        gpt2.generate(gpt2.build(config, "causal-lm"), {}, jnp.zeros((1, 60), jnp.int32), max_new_tokens=8)
    with pytest.raises(ValueError, match="causal-lm"):
        gpt2.generate(gpt2.build(config, "base"), {}, jnp.zeros((1, 4), jnp.int32))
    params = {"transformer": {"h": {"0": {"attn": {"c_attn": {"kernel": 0, "lora_a_q": 0}}}}}}
    with pytest.raises(ValueError, match="merge"):
        params_to_hf(params, config, "causal-lm")
    state = params_to_hf(_init(config), config, "base")
    del state["h.1.ln_1.weight"]
    with pytest.raises(ValueError, match="has no 'transformer.h.1.ln_1.weight'"):
        params_from_hf(state, config, "base")
    state["h.1.crossattention.c_attn.weight"] = np.zeros((32, 64), np.float32)
    state["h.1.ln_1.weight"] = np.ones(32, np.float32)
    with pytest.raises(ValueError, match="crossattention"):
        params_from_hf(state, config, "base")


def _init(config):
    return _tiny_lm()[2]
