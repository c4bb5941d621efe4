"""lora_jax.models.generate against transformers' `generate` (torch) on random tiny GPT-2 and Llama models: greedy
and beam-search tokens identical, beam scores within 1e-4, left padding, eos, no-repeat-ngram, length penalty,
early stopping; the sampling filters against transformers' own logits warpers."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lora_jax import generate as cli
from lora_jax.models import generate as decoding
from lora_jax.models import gpt2, hub, llama

VOCAB, PAD = 97, 1  # not 0: transformers fills finished beams with eos when pad_token_id is 0 (falsy)
LENGTHS = (7, 4, 2)  # per row, left-padded to 7 with PAD
CONFIGS = {
    "gpt2": transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2, pad_token_id=PAD
    ),
    "llama": transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        pad_token_id=PAD,
    ),  # fmt: skip
}
# .ci/run exports LORA_JAX_GPT2_TOKENIZER; the default is the shared folder beside the checkout.
GPT2_TOKENIZER = os.environ.get(
    "LORA_JAX_GPT2_TOKENIZER", str(Path(__file__).resolve().parents[2] / "shared" / "models" / "gpt2-tokenizer")
)
FAMILY = {"gpt2": gpt2, "llama": llama}


@functools.cache
def _models(kind: str, root: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]).eval()
    model.save_pretrained(f"{root}/{kind}")
    module, params, _, _ = hub.from_pretrained(f"{root}/{kind}", task="causal-lm")
    return model, FAMILY[kind].causal_lm(module), params


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("generate"))
    return lambda kind: _models(kind, root)


def _prompts(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.RandomState(seed).randint(3, VOCAB, (len(LENGTHS), max(LENGTHS)))
    mask = (np.arange(max(LENGTHS))[::-1][None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, PAD), mask


def _hf(model, ids, mask, **kw):
    with torch.no_grad():
        out = model.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), pad_token_id=PAD, return_dict_in_generate=True,
            output_scores=True, **kw,
        )  # fmt: skip
    scores = getattr(out, "sequences_scores", None)
    return out.sequences[:, ids.shape[1] :].numpy(), None if scores is None else scores.numpy()


def _mid_eos(tokens: np.ndarray) -> int:
    """A token the first row emits mid-way for the first time: as eos it ends that row early."""
    return int(next(tokens[0, j] for j in range(2, tokens.shape[1]) if tokens[0, j] not in tokens[0, :j]))


def _same_tokens(ours, theirs):
    ours = np.asarray(ours)
    np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1] :] == PAD).all()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("ngram", [0, 2])
def test_greedy_matches_transformers(models, kind, ngram):
    model, lm, params = models(kind)
    ids, mask = _prompts()
    kw = dict(max_new_tokens=10, do_sample=False, no_repeat_ngram_size=ngram)
    free, _ = _hf(model, ids, mask, **kw)
    eos = _mid_eos(free)
    theirs, _ = _hf(model, ids, mask, eos_token_id=eos, **kw)
    ours = decoding.generate(
        lm, params, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD, no_repeat_ngram_size=ngram
    )
    _same_tokens(ours, theirs)
    assert (np.asarray(ours) == eos).any(axis=1).sum() >= 1


def _greedy_banning_continuation_ngrams(model, ids, mask, n: int, steps: int) -> np.ndarray:
    """The LoRA paper's rule (microsoft/LoRA gpt2_beam.py) written out: greedy, one unpadded prompt at a time, an
    n-gram banned only when the continuation itself already holds it; the prompt's n-grams stay allowed."""
    rows = []
    for row, keep in zip(ids, mask, strict=True):
        sequence, out = torch.tensor(row[keep == 1])[None], []
        for _ in range(steps):
            with torch.no_grad():
                logits = model(sequence).logits[0, -1].clone()
            for j in range(len(out) - n + 1):
                if out[j : j + n - 1] == out[len(out) - (n - 1) :]:
                    logits[out[j + n - 1]] = -float("inf")
            out.append(int(logits.argmax()))
            sequence = torch.cat([sequence, torch.tensor([[out[-1]]])], dim=1)
        rows.append(out)
    return np.array(rows)


@pytest.mark.parametrize("ngram", [1, 2])
def test_ngram_over_the_continuation_only_is_the_papers_rule(models, ngram):
    model, lm, params = models("llama")
    ids, mask = _prompts(2)
    kw = dict(max_new_tokens=10, pad_token_id=PAD, no_repeat_ngram_size=ngram)
    ours = np.asarray(decoding.generate(lm, params, ids, mask, ngram_over_prompt=False, **kw))
    np.testing.assert_array_equal(ours, _greedy_banning_continuation_ngrams(model, ids, mask, ngram, 10))
    if ngram == 1:  # banning the prompt's tokens too (transformers' rule) changes what comes out
        assert (ours != np.asarray(decoding.generate(lm, params, ids, mask, **kw))).any()


def test_ngram_blocking_counts_from_where_it_is_told():
    # Prompt 5 6 7, continuation 8 5 6: after "5 6", token 7 would repeat the prompt's 3-gram (5 6 7) and no
    # 3-gram of the continuation's own, so only `first` decides whether 7 is banned.
    sequence = jnp.array([[5, 6, 7, 8, 5, 6, 0]])
    scores = jnp.zeros((1, 10))
    over_prompt = decoding._no_repeat_ngram(scores, sequence, jnp.int32(6), 3, first=0)
    continuation = decoding._no_repeat_ngram(scores, sequence, jnp.int32(6), 3, first=3)
    assert np.isinf(over_prompt[0, 7]) and np.isfinite(np.asarray(over_prompt)).sum() == 9
    assert np.isfinite(np.asarray(continuation)).all()
    repeated = jnp.array([[5, 6, 7, 8, 9, 8, 9, 0]])  # the continuation's own 8 9 -> 8 repeats: 8 is banned
    blocked = decoding._no_repeat_ngram(scores, repeated, jnp.int32(7), 3, first=3)
    assert np.isinf(blocked[0, 8]) and np.isfinite(np.asarray(blocked)).sum() == 9


@pytest.mark.parametrize(
    "kind,beams,length_penalty,ngram,early_stopping",
    [  # the paper's E2E decoding (Table 11: length penalty 0.9, no-repeat-ngram 4 there) on both families
        ("gpt2", 4, 0.9, 2, False),
        ("llama", 4, 0.9, 2, False),
        ("llama", 3, 2.0, 3, True),
        ("gpt2", 4, -0.5, 0, "never"),
    ],
)
def test_beam_search_matches_transformers(models, kind, beams, length_penalty, ngram, early_stopping):
    model, lm, params = models(kind)
    ids, mask = _prompts(1)
    kw = dict(
        max_new_tokens=9, num_beams=beams, length_penalty=length_penalty, no_repeat_ngram_size=ngram,
        early_stopping=early_stopping,
    )  # fmt: skip
    free, _ = _hf(model, ids, mask, do_sample=False, **kw)
    eos = _mid_eos(free)
    theirs, their_scores = _hf(model, ids, mask, do_sample=False, eos_token_id=eos, **kw)
    ours, scores = decoding.beam_search(lm, params, ids, mask, eos_token_id=eos, pad_token_id=PAD, **kw)
    _same_tokens(ours, theirs)
    if length_penalty <= 1.0:  # a short finished beam wins: the finished-beam bookkeeping is exercised
        assert (np.asarray(ours) == eos).any()
    np.testing.assert_allclose(np.asarray(scores), their_scores, atol=1e-4, rtol=0)
    if kind == "gpt2":  # without an eos every beam ends at the length limit
        np.testing.assert_array_equal(decoding.generate(lm, params, ids, mask, pad_token_id=PAD, **kw), free)


def test_right_padded_prompts_decode_as_left_padded(models):
    _, lm, params = models("llama")
    ids, mask = _prompts()
    right_ids = np.stack([np.roll(r, n) for r, n in zip(ids, LENGTHS, strict=True)])
    right_mask = np.stack([np.roll(r, n) for r, n in zip(mask, LENGTHS, strict=True)])
    assert (right_mask[:, 0] == 1).all()
    left = decoding.generate(lm, params, ids, mask, max_new_tokens=6, num_beams=2)
    np.testing.assert_array_equal(
        decoding.generate(lm, params, right_ids, right_mask, max_new_tokens=6, num_beams=2), left
    )
    alone = decoding.generate(lm, params, ids[2:, -LENGTHS[2] :], mask[2:, -LENGTHS[2] :], max_new_tokens=6)
    np.testing.assert_array_equal(decoding.generate(lm, params, ids, mask, max_new_tokens=6)[2:], alone)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 7, 0.6)])
def test_sampling_filters_match_transformers_warpers(temperature, top_k, top_p):
    logits = 3.0 * jax.random.normal(jax.random.key(0), (4, VOCAB))
    knobs = {"temperature": jnp.float32(temperature), "top_k": jnp.int32(top_k), "top_p": jnp.float32(top_p)}
    ours = np.asarray(decoding._sample_filter(logits, knobs))
    warpers = [transformers.TemperatureLogitsWarper(temperature)]
    warpers += [transformers.TopKLogitsWarper(top_k)] if top_k else []
    warpers += [transformers.TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    theirs = transformers.LogitsProcessorList(warpers)(None, torch.tensor(np.asarray(logits))).numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    kept = ~np.isinf(theirs)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6)
    assert kept.sum(axis=1).min() >= 1 and (kept.sum(axis=1) < VOCAB).all() == (top_k > 0 or top_p < 1.0)


def test_sampling_draws_from_the_filtered_distribution(models):
    _, lm, params = models("llama")
    ids, mask = _prompts()
    sample = functools.partial(decoding.generate, lm, params, ids, mask, max_new_tokens=8, do_sample=True)
    greedy = decoding.generate(lm, params, ids, mask, max_new_tokens=8)
    np.testing.assert_array_equal(sample(top_k=1, rng=jax.random.key(3)), greedy)  # top-1 is greedy
    np.testing.assert_array_equal(sample(top_p=1e-6, rng=jax.random.key(4)), greedy)  # so is a tiny nucleus
    a, b = sample(rng=jax.random.key(0), temperature=2.0), sample(rng=jax.random.key(1), temperature=2.0)
    np.testing.assert_array_equal(a, sample(rng=jax.random.key(0), temperature=2.0))  # the key decides
    assert (np.asarray(a) != np.asarray(b)).any()


def test_bad_arguments_are_refused_with_a_fix(models):
    _, lm, params = models("llama")
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 64"):
        decoding.generate(lm, params, ids, max_new_tokens=61)
    with pytest.raises(ValueError, match="rng=jax.random.key"):
        decoding.generate(lm, params, ids, max_new_tokens=8, do_sample=True)
    with pytest.raises(ValueError, match="early_stopping"):
        decoding.generate(lm, params, ids, max_new_tokens=8, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="top_p"):
        decoding.generate(lm, params, ids, max_new_tokens=8, do_sample=True, top_p=0.0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="causal-lm"):
        llama.causal_lm(llama.build(llama.Config(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4), "base"))


CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.skipif(not Path(GPT2_TOKENIZER).is_dir(), reason="no GPT-2 tokenizer (set LORA_JAX_GPT2_TOKENIZER)")
def test_command_line_chats_through_the_template(tmp_path, capsys):
    tokenizer = transformers.AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    tokenizer.chat_template = CHAT
    config = transformers.LlamaConfig(**{**CONFIGS["llama"].to_dict(), "vocab_size": len(tokenizer)})
    config.eos_token_id = config.bos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    answers = cli.main([str(tmp_path), "--prompt", "Hello there", "--prompt", "Hi", "--chat", "--max-new-tokens", "5"])
    assert capsys.readouterr().out.splitlines() == [a.strip() for a in answers]

    module, params, _, _ = hub.from_pretrained(tmp_path, task="causal-lm")
    text = "<|user|>Hello there\n<|assistant|>"
    ids = tokenizer(text, return_tensors="np")["input_ids"]
    tokens = decoding.generate(
        llama.causal_lm(module), params, ids, max_new_tokens=5, eos_token_id=tokenizer.eos_token_id
    )
    assert answers[0] == tokenizer.decode(np.asarray(tokens)[0], skip_special_tokens=True)
    with pytest.raises(ValueError, match="no chat template"):
        cli.prompt_texts(transformers.AutoTokenizer.from_pretrained(GPT2_TOKENIZER), ["x"], True, None)
