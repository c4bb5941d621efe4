"""T5 / mT5 against transformers' torch models: outputs, round trips, LoRA targets, greedy and beam decoding, and
the parameter count of mT0-large (mT5-large) with LoRA, computed without allocating it."""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_jax.lora import lora_wrap, merge
from lora_jax.methods import count_params
from lora_jax.models import hub, seq2seq_generate, t5
from lora_jax.models.spec import config_from_hf, param_shapes, params_from_hf, params_to_hf
from lora_jax.tree import leaf_paths
from tests.test_hub import perturb_lora_b

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4
VOCAB, EOS = 100, 1
# 8 buckets over max_distance 12: decoder (length 20) and encoder (11) distances reach the log-spaced buckets.
TINY = dict(
    vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=12, decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS,
)  # fmt: skip
VARIANTS = {
    "t5": (transformers.T5Config, transformers.T5ForConditionalGeneration, dict(feed_forward_proj="relu")),
    "mt5": (transformers.MT5Config, transformers.MT5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu")),
}


def _randomise(model, tied: bool):
    """Weights of unit-scale outputs, random norm scales and (untied) an LM head of its own.

    transformers' init makes tiny T5s repeat one token forever; these weights give varied continuations that end
    at different steps, so greedy and beam search have real choices to get right.
    """
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("shared", "lm_head")):
                continue
            if p.ndim == 2:
                gain = 3.0 if "relative_attention_bias" in name else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            else:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        if not tied:  # a head of its own (transformers ties it to `shared` at init)
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, TINY["d_model"], generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{variant: (folder, torch model)}: T5 v1.0 (relu, tied head) and mT5 (gated-gelu, own head)."""
    out = {}
    for i, (name, (config_cls, model_cls, kw)) in enumerate(VARIANTS.items()):
        torch.manual_seed(i)
        model = _randomise(model_cls(config_cls(**TINY, **kw)), tied=name == "t5")
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


def _load(folder, task="seq2seq-lm"):
    config = config_from_hf(json.loads((folder / "config.json").read_text()), task)
    params, new = params_from_hf(load_file(folder / "model.safetensors"), config, task)
    return t5.build(config, task), params, config, new


@functools.cache
def _jitted_apply(module):
    return jax.jit(module.apply)


def _batch(seed=0):
    """Encoder rows of 11, 7 and 3 real tokens; decoder rows of 20 and 20 and 6 (right-padded)."""
    rng = np.random.default_rng(seed)
    ids, dec = rng.integers(2, VOCAB, (3, 11)), rng.integers(2, VOCAB, (3, 20))
    mask, dec_mask = np.ones_like(ids), np.ones_like(dec)
    mask[1, 7:], mask[2, 3:], dec_mask[2, 6:] = 0, 0, 0
    return np.where(mask == 1, ids, 0), mask, np.where(dec_mask == 1, dec, 0), dec_mask


def _torch(model, ids, mask, dec, dec_mask):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec),
            decoder_attention_mask=torch.tensor(dec_mask),
        )


def _max_diff(ours, ref, mask):
    return float(np.abs(np.asarray(ours)[mask.astype(bool)] - np.asarray(ref)[mask.astype(bool)]).max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encoder_states_and_logits_match_transformers_on_padded_batches(checkpoints, variant):
    folder, model = checkpoints[variant]
    module, params, config, new = _load(folder)
    assert new == [] and config.tie_word_embeddings == (variant == "t5")
    assert config.gated == (variant == "mt5")
    batch = _batch()
    ref, out = _torch(model, *batch), _jitted_apply(module)({"params": params}, *batch)
    encoder_diff = _max_diff(out["encoder_last_hidden_state"], ref.encoder_last_hidden_state, batch[1])
    logits_diff = _max_diff(out["logits"], ref.logits, batch[3])
    print(f"{variant}: encoder hidden max abs diff {encoder_diff:.2e}, logits {logits_diff:.2e}")
    assert encoder_diff <= TOL and logits_diff <= TOL
    assert np.abs(ref.logits.numpy()).max() > 1.0  # the logits are not all ~0, so the bound means something


def test_base_model_matches_t5model(checkpoints):
    folder, _ = checkpoints["mt5"]
    module, params, _, new = _load(folder, "base")
    assert new == [] and "lm_head" not in params  # the LM checkpoint's head is ignored
    reference = transformers.MT5Model.from_pretrained(folder).eval()
    batch = _batch(1)
    ref, out = _torch(reference, *batch), _jitted_apply(module)({"params": params}, *batch)
    assert "logits" not in out
    diff = _max_diff(out["last_hidden_state"], ref.last_hidden_state, batch[3])
    print(f"MT5Model decoder hidden max abs diff {diff:.2e}")
    assert diff <= TOL


def test_decoding_with_the_kv_cache_matches_the_full_decoder(checkpoints):
    module, params, config, _ = _load(checkpoints["t5"][0])
    ids, mask, dec, dec_mask = batch = _batch()
    out = _jitted_apply(module)({"params": params}, *batch)
    full, encoded = out["logits"], out["encoder_last_hidden_state"]
    cache = t5.init_cache(config, ids.shape[0], dec.shape[1])
    step = jax.jit(functools.partial(module.apply, method="decode"))
    steps = []
    for i in range(dec.shape[1]):
        out = step({"params": params}, dec[:, i : i + 1], encoded, mask, cache=cache, cache_index=i)
        cache = out["cache"]
        steps.append(out["logits"][:, 0])
    diff = _max_diff(jnp.stack(steps, axis=1), full, dec_mask)  # pads are keys in the full pass only
    print(f"cached step-by-step vs full decoder logits max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_params_to_hf_loads_into_a_fresh_torch_model(checkpoints, variant):
    folder, model = checkpoints[variant]
    _, params, config, _ = _load(folder)
    state = params_to_hf(params, config, "seq2seq-lm")
    config_cls, model_cls, kw = VARIANTS[variant]
    torch.manual_seed(123)
    fresh = model_cls(config_cls(**TINY, **kw)).eval()
    if variant == "mt5":
        fresh.lm_head.weight = torch.nn.Parameter(torch.zeros(VOCAB, TINY["d_model"]))  # untie before loading
    aliases = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    assert set(state) == set(fresh.state_dict()) - aliases
    missing, unexpected = fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, False)
    assert set(missing) <= aliases and unexpected == []
    batch = _batch()
    np.testing.assert_array_equal(_torch(fresh, *batch).logits.numpy(), _torch(model, *batch).logits.numpy())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hub_round_trip_with_merged_lora(checkpoints, tmp_path, variant):
    folder, model = checkpoints[variant]
    module, params, _, config = hub.from_pretrained(folder, task="seq2seq-lm")
    assert isinstance(config, t5.Config) and config.model_type == variant
    batch = _batch()
    lora = hub.lora_config(variant, ("q", "v", "mlp"), r=4, alpha=8)
    wrapped = perturb_lora_b(lora_wrap(params, lora, jax.random.key(0)))
    lora_logits = _jitted_apply(module)({"params": wrapped}, *batch)["logits"]
    assert _max_diff(lora_logits, _torch(model, *batch).logits, batch[3]) > 1e-2  # the adapters change the model
    hub.to_pretrained(module, wrapped, tmp_path, "seq2seq-lm")
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    diff = _max_diff(_torch(reloaded, *batch).logits, lora_logits, batch[3])
    scale = float(np.abs(np.asarray(lora_logits)).max())
    print(f"{variant}: merged-LoRA export vs LoRA forward, logits max abs diff {diff:.2e} (max |logit| {scale:.1f})")
    assert diff <= TOL * max(1.0, scale / 10)  # merging rounds W + BA once: float32 error grows with the logits
    _, again, _, _ = hub.from_pretrained(tmp_path, task="seq2seq-lm")
    for (path, a), (_, b) in zip(leaf_paths(merge(wrapped)), leaf_paths(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)


def test_lora_q_v_adapts_exactly_the_modules_peft_adapts(checkpoints):
    """PEFT's default T5 targets ["q", "v"]: every q and v, self- and cross-attention, encoder and decoder."""
    folder, _ = checkpoints["mt5"]
    _, params, _, _ = _load(folder)
    model = transformers.MT5ForConditionalGeneration.from_pretrained(folder)  # PEFT wraps it in place
    wrapped = lora_wrap(params, hub.lora_config("mt5", ("q", "v"), r=2), jax.random.key(0))
    ours = sorted({p.rsplit(".", 1)[0] for p, _ in leaf_paths(wrapped) if p.endswith(".lora_a")})
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, task_type="SEQ_2_SEQ_LM"))
    theirs = sorted(
        n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
        for n, _ in peft_model.named_modules()
        if n.endswith(".lora_A.default")
    )
    assert ours == theirs and len(ours) == 2 * (2 + 2 * 2)  # q and v in 2 encoder + 2x2 decoder attentions


def _prompts():
    rng = np.random.default_rng(0)
    ids = rng.integers(2, VOCAB, (6, 7))
    mask = np.ones_like(ids)
    mask[1, 4:], mask[3, 2:] = 0, 0
    return np.where(mask == 1, ids, 0), mask


def _hf_generate(model, ids, mask, **kw):
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=8,
            return_dict_in_generate=True, output_scores=True, **kw,
        )  # fmt: skip
    return out.sequences.numpy()[:, 1:], (out.sequences_scores.numpy() if "num_beams" in kw else None)


def _until_eos(row):
    """The tokens up to and including the first eos (transformers fills after it with eos or pad)."""
    hits = np.flatnonzero(row == EOS)
    return row[: hits[0] + 1] if len(hits) else row


def test_greedy_matches_transformers(checkpoints):
    folder, model = checkpoints["mt5"]
    module, params, _, _ = _load(folder)
    ids, mask = _prompts()
    ref, _ = _hf_generate(model, ids, mask)
    ours = np.asarray(seq2seq_generate.generate(module, params, ids, mask, max_new_tokens=8))
    print("greedy (transformers):\n", ref)
    assert ours.shape == (6, 8)
    ended = [EOS in row for row in ref]
    assert 0 < sum(ended) < len(ref)  # some rows stop early, some run to the limit
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(_until_eos(a), _until_eos(b))
        assert (a[len(_until_eos(a)) :] == 0).all()  # pad after eos


@pytest.mark.parametrize("length_penalty, early_stopping", [(1.0, True), (2.0, False)])
def test_beam_search_matches_transformers(checkpoints, length_penalty, early_stopping):
    folder, model = checkpoints["mt5"]
    module, params, _, _ = _load(folder)
    ids, mask = _prompts()
    ref, ref_scores = _hf_generate(
        model, ids, mask, num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping
    )
    greedy, _ = _hf_generate(model, ids, mask)
    tokens, scores = seq2seq_generate.beam_search(module, params, ids, mask, 8, 3, length_penalty, early_stopping)
    print("beam (transformers):\n", ref, ref_scores)
    assert any(
        not np.array_equal(_until_eos(a), _until_eos(b)) for a, b in zip(ref, greedy, strict=True)
    )  # beam search chose differently from greedy somewhere, so the test can tell them apart
    for a, b in zip(np.asarray(tokens), ref, strict=True):
        np.testing.assert_array_equal(_until_eos(a), _until_eos(b))
    np.testing.assert_allclose(np.asarray(scores), ref_scores, atol=1e-5, rtol=1e-5)


def test_shift_right_matches_transformers(checkpoints):
    labels = np.array([[5, 6, EOS, -100], [7, EOS, -100, -100]])
    model = checkpoints["t5"][1]
    expected = model._shift_right(torch.tensor(labels)).numpy()
    np.testing.assert_array_equal(np.asarray(t5.shift_right(jnp.asarray(labels), 0, 0)), expected)


def test_dropout_and_remat(checkpoints):
    module, params, config, _ = _load(checkpoints["t5"][0])
    batch = _batch()
    det = _jitted_apply(module)({"params": params}, *batch)["logits"]

    @jax.jit
    def train_mode(seed):  # an rbg key: its dropout masks compile in half the time of threefry's on CPU
        rngs = {"dropout": jax.random.key(seed, impl="rbg")}
        return module.apply({"params": params}, *batch, deterministic=False, rngs=rngs)

    a, b = train_mode(0)["logits"], train_mode(1)["logits"]
    assert not np.allclose(a, det) and not np.allclose(a, b)  # dropout is on, and follows the rng
    np.testing.assert_array_equal(train_mode(0)["logits"], a)

    # remat: the backward pass recomputes each block (a checkpoint per block in the jaxpr, beside those of single
    # ops: masked_softmax, the activations), same function.
    remat = t5.build(dataclasses.replace(config, remat=True), "seq2seq-lm")
    loss = lambda m: lambda p: m.apply({"params": p}, *batch)["logits"].sum()  # noqa: E731
    jaxpr = lambda m: str(jax.make_jaxpr(jax.grad(loss(m)))(params))  # noqa: E731
    checkpoints_in = lambda m: len(re.findall(r"\b(?:remat\d*|checkpoint)\b", jaxpr(m)))  # noqa: E731
    assert checkpoints_in(remat) >= checkpoints_in(module) + 2 * config.num_layers  # encoder + decoder blocks


def test_bad_inputs_say_how_to_fix_them():
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5.Config(feed_forward_proj="gated-swishy")
    with pytest.raises(ValueError, match="task"):
        config_from_hf({"model_type": "t5"}, "causal-lm")
    with pytest.raises(ValueError, match="not T5"):
        config_from_hf({"model_type": "bert"}, "seq2seq-lm", family=t5.SPEC)


# mT0-large = mT5-large (bigscience/mt0-large's config.json), built here, never downloaded.
MT5_LARGE = dict(
    vocab_size=250112, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
)  # fmt: skip


def _zero_stride(shapes):
    """A pytree of read-only zero-stride views: the shapes and dtypes of 1.2B parameters in no memory at all."""
    tree = {}
    for path, spec in shapes.items():
        node = tree
        *parents, leaf = path.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = np.broadcast_to(np.zeros((), spec.dtype), spec.shape)
    return tree


def test_mt0_large_lora_count_without_allocating_it():
    hf_config = transformers.MT5Config(**MT5_LARGE).to_dict()
    config = config_from_hf(hf_config, "seq2seq-lm")
    shapes = param_shapes(config, "seq2seq-lm")
    # Every tensor of transformers' own model (built on the meta device: no memory) has our shape.
    with torch.device("meta"):
        reference = transformers.MT5ForConditionalGeneration(transformers.MT5Config(**MT5_LARGE))
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items() if "embed_tokens" not in k}
    # (params_to_hf would make each view contiguous, i.e. allocate it: map the names and shapes by hand.)
    ours = {
        f"{p.rsplit('.', 1)[0]}.weight": s.shape[::-1] if p.endswith("kernel") else s.shape for p, s in shapes.items()
    }
    assert ours == ref_shapes
    base_total = sum(int(np.prod(s)) for s in ref_shapes.values())
    assert count_params(_zero_stride(shapes)).total == base_total

    for r, trainable in ((8, 2_359_296), (12, 3_538_944)):
        lora = hub.lora_config("mt5", ("q", "v"), r=r, alpha=32, dropout=0.1)
        wrapped = lora_wrap(_zero_stride(shapes), lora, jax.random.key(0))
        count = count_params(wrapped, lora)
        print(f"mt0-large LoRA r={r}: {count}")
        # 72 attentions (24 encoder self, 24 decoder self, 24 cross) x (q, v) x r x (1024 + 1024).
        assert count.trainable == 72 * 2 * r * (1024 + 1024) == trainable
        assert count.total == base_total + trainable
        if r == 8:
            assert count.total == 1_231_940_608  # PEFT's print_trainable_parameters on the real mt0-large
