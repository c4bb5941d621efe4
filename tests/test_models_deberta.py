"""DeBERTa-v2/v3 against transformers' torch implementation: the same weights must give the same outputs."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta  # noqa: E402

from lora_jax import lora, tree  # noqa: E402
from lora_jax.models import deberta  # noqa: E402
from lora_jax.models.spec import config_from_hf, config_to_hf, params_from_hf, params_to_hf  # noqa: E402

TOL = 1e-4  # fp32 on CPU
CLS = "sequence-classification"
TINY = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    relative_attention=True,
)
VARIANTS = {
    # v3: log-bucketed positions, shared projections, normalised relative table, no absolute positions.
    "v3": dict(
        position_buckets=8,
        pos_att_type=["p2c", "c2p"],
        share_att_key=True,
        norm_rel_ebd="layer_norm",
        position_biased_input=False,
        type_vocab_size=0,
    ),
    # v2-style: separate position projections, clipped distances, absolute positions, token types,
    # embedding projection, the n-gram ConvLayer and the tanh GELU.
    "v2": dict(
        position_buckets=-1,
        max_relative_positions=4,
        pos_att_type="p2c|c2p",
        share_att_key=False,
        position_biased_input=True,
        type_vocab_size=2,
        embedding_size=24,
        conv_kernel_size=3,
        hidden_act="gelu_new",
    ),
}


def _hf_config(variant: str, **kw) -> transformers.DebertaV2Config:
    return transformers.DebertaV2Config(**{**TINY, **VARIANTS[variant], **kw})


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Noise on every weight, so a swapped LayerNorm scale/bias or a missed transpose cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


_SAVED: dict = {}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """saved(variant, num_labels, head) -> (torch model, folder), each saved once per module."""

    def get(variant: str, num_labels: int = 3, head: bool = True):
        key = (variant, num_labels, head)
        if key not in _SAVED:
            torch.manual_seed(0)
            cls = transformers.DebertaV2ForSequenceClassification if head else transformers.DebertaV2Model
            model = _perturbed(cls(_hf_config(variant, num_labels=num_labels)), seed=1)
            folder = tmp_path_factory.mktemp(f"deberta-{variant}-{num_labels}-{head}")
            model.save_pretrained(folder)
            _SAVED[key] = (model, folder)
        return _SAVED[key]

    return get


def _batch(type_vocab_size: int):
    rng = np.random.default_rng(0)
    mask = np.ones((3, 12), np.int64)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    ids = rng.integers(1, TINY["vocab_size"], mask.shape) * mask  # pad id 0 where masked
    types = rng.integers(0, max(type_vocab_size, 1), mask.shape)
    return ids, mask, types


def _load(folder, task: str, **overrides):
    hf = json.loads((folder / "config.json").read_text())
    config = dataclasses.replace(config_from_hf(hf, task), **overrides)
    params, new = params_from_hf(load_file(folder / "model.safetensors"), config, task)
    return config, params, new


@functools.cache
def _forward(config, task: str, deterministic: bool = True):
    """One jitted apply per (config, task, mode), shared by every test (compiling dominates the runtime)."""
    module = deberta.build(config, task)
    return jax.jit(
        lambda p, ids, mask, types, key: module.apply(
            {"params": p}, ids, mask, types, deterministic=deterministic, rngs={"dropout": key}
        )
    )


def _run(config, params, task, ids, mask, types, deterministic=True, seed=0):
    args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types), jax.random.key(seed))
    out = _forward(config, task, deterministic)(params, *args)
    return {k: np.asarray(v) for k, v in out.items()}


def _torch_run(model, ids, mask, types):
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    return out


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("variant,num_labels", [("v3", 3), ("v2", 3), ("v3", 1)])  # 1 label: regression
def test_matches_transformers_with_padding(saved, variant, num_labels):
    model, folder = saved(variant, num_labels)
    config, params, new = _load(folder, CLS)
    assert new == []
    ids, mask, types = _batch(model.config.type_vocab_size)
    ours = _run(config, params, CLS, ids, mask, types)
    with torch.no_grad():
        hidden = model.deberta(
            torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        ).last_hidden_state.numpy()
    logits = _torch_run(model, ids, mask, types).logits.numpy()
    keep = mask.astype(bool)
    assert ours["logits"].shape == (3, num_labels)
    assert _max_diff(ours["last_hidden_state"][keep], hidden[keep]) <= TOL
    assert _max_diff(ours["logits"], logits) <= TOL


def test_base_checkpoint_and_fresh_head(saved):
    model, folder = saved("v3", head=False)
    ids, mask, types = _batch(0)
    config, params, new = _load(folder, "base")
    assert new == [] and set(params) == {"deberta"}
    ours = _run(config, params, "base", ids, mask, types)
    expected = _torch_run(model, ids, mask, types).last_hidden_state.numpy()
    assert _max_diff(ours["last_hidden_state"][mask.astype(bool)], expected[mask.astype(bool)]) <= TOL

    # No mask means every position counts, as in HF.
    module = deberta.build(config, "base")
    out = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, jnp.asarray(ids))
    with torch.no_grad():
        expected = model(torch.tensor(ids)).last_hidden_state.numpy()
    assert _max_diff(out["last_hidden_state"], expected) <= TOL

    # A backbone-only checkpoint under a classifier: the head is new, initialised as transformers does.
    config, params, new = _load(folder, CLS)
    assert sorted(new) == ["classifier.bias", "classifier.kernel", "pooler.dense.bias", "pooler.dense.kernel"]
    assert np.all(np.asarray(params["classifier"]["bias"]) == 0)
    std = float(np.std(np.asarray(params["pooler"]["dense"]["kernel"])))
    assert 0.5 * config.initializer_range < std < 2 * config.initializer_range


def test_checkpoint_keys_extra_and_missing(saved):
    _, folder = saved("v3")
    hf = json.loads((folder / "config.json").read_text())
    config = config_from_hf(hf, CLS)
    state = load_file(folder / "model.safetensors")
    # Pretrained DeBERTa-v3 files are MLM checkpoints: their head and buffers are not ours to load.
    extra = {"lm_predictions.lm_head.bias": np.zeros(100), "deberta.embeddings.position_ids": np.arange(64)}
    params, new = params_from_hf({**state, **extra}, config, CLS)
    assert new == [] and "lm_predictions" not in params
    del state["deberta.encoder.rel_embeddings.weight"]
    with pytest.raises(KeyError, match="rel_embeddings"):
        params_from_hf(state, config, CLS)
    with pytest.raises(ValueError, match="causal-lm"):
        deberta.build(config, "causal-lm")


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_params_to_hf_loads_into_fresh_torch_model(saved, variant):
    model, folder = saved(variant)
    config, params, _ = _load(folder, CLS)
    state = {k: torch.tensor(v) for k, v in params_to_hf(params, config, CLS).items()}
    fresh = transformers.DebertaV2ForSequenceClassification(_hf_config(variant, num_labels=3)).eval()
    fresh.load_state_dict(state, strict=True)
    ids, mask, types = _batch(model.config.type_vocab_size)
    assert torch.equal(_torch_run(fresh, ids, mask, types).logits, _torch_run(model, ids, mask, types).logits)

    # The base task writes DebertaV2Model's keys (no `deberta.` prefix).
    backbone = {"deberta": params["deberta"]}
    base_state = {k: torch.tensor(v) for k, v in params_to_hf(backbone, config, "base").items()}
    transformers.DebertaV2Model(_hf_config(variant)).load_state_dict(base_state, strict=True)

    with pytest.raises(ValueError, match="merge"):
        wrapped = lora.lora_wrap(params, lora.LoraConfig(targets=("query_proj",)), jax.random.key(0))
        params_to_hf(wrapped, config, CLS)


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_config_round_trips_through_transformers(variant):
    config = config_from_hf(_hf_config(variant, num_labels=3).to_dict(), CLS)
    hf = transformers.DebertaV2Config.from_dict(config_to_hf(config, CLS))
    assert config_from_hf(hf.to_dict(), CLS) == config
    assert hf.num_labels == 3 and hf.pos_att_type == ["p2c", "c2p"]


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_lora_merged_equals_unmerged(saved, variant):
    model, folder = saved(variant)
    config, params, _ = _load(folder, CLS)
    targets = (deberta.LORA_TARGETS["q"], deberta.LORA_TARGETS["v"])
    wrapped = lora.lora_wrap(params, lora.LoraConfig(r=4, alpha=8.0, targets=targets), jax.random.key(0))
    key = iter(jax.random.split(jax.random.key(1), 64))
    wrapped = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.random.normal(next(key), x.shape) * 0.5 if "lora_b" in str(path[-1]) else x,
        wrapped,
    )
    ids, mask, types = _batch(model.config.type_vocab_size)
    base = _run(config, params, CLS, ids, mask, types)
    unmerged = _run(config, wrapped, CLS, ids, mask, types)
    merged = _run(config, lora.merge(wrapped), CLS, ids, mask, types)
    assert _max_diff(unmerged["last_hidden_state"], base["last_hidden_state"]) > 0.1  # the adapter acts
    for name in ("last_hidden_state", "logits"):
        assert _max_diff(merged[name], unmerged[name]) <= TOL


def test_lora_targets_name_the_right_kernels(saved):
    _, folder = saved("v2")
    _, params, _ = _load(folder, CLS)
    kernels = lora.available_kernels(params)
    matched = {
        name: sorted(k for k in kernels if tree.matches_module(pattern, k))
        for name, pattern in deberta.LORA_TARGETS.items()
    }
    layer = "deberta.encoder.layer.{}."
    expected = {
        "q": ["attention.self.query_proj"],
        "k": ["attention.self.key_proj"],
        "v": ["attention.self.value_proj"],
        "o": ["attention.output.dense"],
        "mlp": ["intermediate.dense", "output.dense"],
    }
    for name, suffixes in expected.items():
        assert matched[name] == sorted(layer.format(i) + s for i in range(2) for s in suffixes), name


@pytest.mark.parametrize("length,buckets,max_position", [(12, 8, 64), (40, 16, 32), (9, -1, 4), (300, 256, 512)])
def test_relative_positions_match_transformers(length, buckets, max_position):
    x = torch.zeros(1, length, 1)
    expected = hf_deberta.build_relative_position(x, x, bucket_size=buckets, max_position=max_position)
    ours = deberta.relative_positions(length, buckets, max_position)
    np.testing.assert_array_equal(np.asarray(ours), expected[0].numpy())


def test_dropout_remat_and_bf16(saved):
    model, folder = saved("v3")
    config, params, _ = _load(folder, CLS)
    ids, mask, types = _batch(0)
    clean = _run(config, params, CLS, ids, mask, types)["logits"]

    noisy = [_run(config, params, CLS, ids, mask, types, deterministic=False, seed=s) for s in (0, 0, 1)]
    assert np.array_equal(noisy[0]["logits"], noisy[1]["logits"])
    assert _max_diff(noisy[0]["logits"], noisy[2]["logits"]) > 1e-3
    assert _max_diff(noisy[0]["logits"], clean) > 1e-3

    def backward_program(cfg) -> str:
        module = deberta.build(cfg, CLS)
        loss = lambda p: module.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask))["logits"].sum()
        return str(jax.make_jaxpr(jax.grad(loss))(params))

    # remat changes what the backward pass stores, never the values (JAX's own guarantee): check it is there.
    remat = dataclasses.replace(config, remat=True)
    assert _max_diff(_run(remat, params, CLS, ids, mask, types)["logits"], clean) <= TOL
    # (single ops are checkpointed either way, see common.ACTIVATIONS; layer remat adds one per layer)
    assert backward_program(remat).count("remat") > backward_program(config).count("remat")

    bf16 = dataclasses.replace(config, dtype="bfloat16")
    out = _run(bf16, params, CLS, ids, mask, types)
    assert out["last_hidden_state"].dtype == jnp.bfloat16
    # bf16 keeps 8 bits of mantissa: ~2e-2 of drift on hidden states of size ~4 after two layers.
    full = _run(config, params, CLS, ids, mask, types)["last_hidden_state"]
    assert _max_diff(out["last_hidden_state"], full) < 0.1


def test_hub_round_trip(saved, tmp_path):
    hub = pytest.importorskip("lora_jax.models.hub", reason="lora_jax.models.hub is not written yet")
    model, folder = saved("v2")
    module, params, _, config = hub.from_pretrained(folder, task=CLS)
    ids, mask, types = _batch(model.config.type_vocab_size)
    ours = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    expected = _torch_run(model, ids, mask, types).logits.numpy()
    assert _max_diff(ours["logits"], expected) <= TOL

    hub.to_pretrained(module, params, tmp_path, task=CLS)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, transformers.DebertaV2ForSequenceClassification)
    assert torch.equal(_torch_run(reloaded, ids, mask, types).logits, _torch_run(model, ids, mask, types).logits)
