"""Decoding for decoder-only language models under jit: greedy, sampling (temperature, top-k, top-p) and beam
search (length penalty, early stopping), with no-repeat-ngram blocking in all three, over a fixed-size KV cache.

One compiled program per (batch, prompt length, settings): the prompt fills the cache in one call (prefill),
then a `lax.while_loop` runs one-token steps, so decoding a test set never recompiles. Prompts may be padded on
either side (moved to the left first); positions count real tokens only, so a padded prompt decodes as it would
alone. Each mode follows transformers' `generate` step for step (its logits processors in its order, its
vectorised beam search with the same candidates, scores and early-stop heuristic), so tokens and beam scores
match it.

Mixed batches: params `route`d by an adapter bank (`lora_jax.bank.route`, one adapter per prompt) decode as they
are; beam search repeats each prompt's adapter for its beams, whose cache rows never leave their prompt.

A model plugs in as a `CausalLM`: a logits function, a cache constructor and a maximum length. Nothing here
knows a family: gpt2.causal_lm and llama.causal_lm build one from a module.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lora_jax.bank import repeat_rows, routed_rows

_NEG = -1.0e9  # transformers' "impossible" beam score; kept identical so sums and ties match


@dataclasses.dataclass(frozen=True)
class CausalLM:
    """What decoding needs from a decoder-only model.

    logits(params, tokens, positions, cache, mask, index) -> (logits, cache): float32 next-token logits
        (rows, vocab) of the last of `tokens` (rows, length), which sit at positions (rows, length) and are
        written to cache slots index..; `mask` (rows, cache_length) says which slots hold real tokens.
    init_cache(rows, cache_length) -> an empty cache, a pytree whose leaves all have rows as their first axis.
    max_length: the longest prompt + continuation the model takes (its position table), or None.
    """

    logits: Callable[..., tuple[jax.Array, Any]]
    init_cache: Callable[[int, int], Any]
    max_length: int | None = None
    max_length_name: str = "max_length"  # the config field it comes from, for the error message


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static part of a decode: what changes the compiled program (eos: any number of ids)."""

    max_new_tokens: int
    eos: tuple[int, ...]
    pad: int
    do_sample: bool
    num_beams: int
    no_repeat_ngram_size: int
    early_stopping: bool | str
    ngram_over_prompt: bool = True


def generate(
    lm: CausalLM,
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    max_new_tokens: int = 64,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    no_repeat_ngram_size: int = 0,
    rng: jax.Array | None = None,
    ngram_over_prompt: bool = True,
) -> jax.Array:
    """Continuations (batch, max_new_tokens); after a row's eos comes pad_token_id (default: the first eos).

    Arguments mean what they mean in transformers' `generate`; top_k=0 and top_p=1.0 switch those filters off.
    `rng` (a jax key) is needed with do_sample. num_beams > 1 returns the best beam (`beam_search` also gives
    its score). `params` may be a bank's `route(base, stack, adapter_ids)`: each prompt decodes with its adapter.
    `ngram_over_prompt=False` bans only n-grams the continuation itself repeats, as the LoRA paper's decoder
    (microsoft/LoRA gpt2_beam.py) does; transformers (the default, True) also bans copying the prompt's n-grams.
    """
    return _decode(**locals())[0]


def beam_search(
    lm: CausalLM,
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    max_new_tokens: int = 64,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    no_repeat_ngram_size: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    ngram_over_prompt: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """(best beam's tokens (batch, max_new_tokens), its score (batch,)): the score is transformers'
    `sequences_scores`, sum of log-probs / generated_length ** length_penalty."""
    return _decode(**locals())


def _decode(
    lm, params, input_ids, attention_mask=None, max_new_tokens=64, eos_token_id=None, pad_token_id=None,
    do_sample=False, temperature=1.0, top_k=0, top_p=1.0, num_beams=1, length_penalty=1.0, early_stopping=False,
    no_repeat_ngram_size=0, rng=None, ngram_over_prompt=True,
):  # fmt: skip
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    _check(lm, input_ids.shape[1], max_new_tokens, num_beams, do_sample, rng, early_stopping, top_p, temperature)
    routed = routed_rows(params)
    if routed is not None and routed != input_ids.shape[0]:
        raise ValueError(
            f"params are routed for {routed} rows but {input_ids.shape[0]} prompts came; one id per prompt."
        )
    eos = () if eos_token_id is None else tuple(int(e) for e in _as_list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    ngram = int(no_repeat_ngram_size)
    plan = Plan(max_new_tokens, eos, int(pad), do_sample, num_beams, ngram, early_stopping, bool(ngram_over_prompt))
    key = jax.random.key(0) if rng is None else rng
    return _run(lm, plan, params, input_ids, mask, decode_knobs(temperature, top_k, top_p, length_penalty), key)


def decode_knobs(
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, length_penalty: float = 1.0
) -> dict[str, jax.Array]:
    """The traced part of a decode: trying other values does not recompile."""
    values = dict(temperature=temperature, top_k=top_k, top_p=top_p, length_penalty=length_penalty)
    return {k: jnp.asarray(v, jnp.int32 if k == "top_k" else jnp.float32) for k, v in values.items()}


def _as_list(value: int | Sequence[int]) -> list[int]:
    return [value] if isinstance(value, int) else list(value)


def _check(lm, prompt_len, max_new_tokens, num_beams, do_sample, rng, early_stopping, top_p, temperature) -> None:
    if max_new_tokens < 1 or num_beams < 1:
        raise ValueError(f"need max_new_tokens >= 1 and num_beams >= 1, got {max_new_tokens} and {num_beams}.")
    if lm.max_length is not None and prompt_len + max_new_tokens > lm.max_length:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds {lm.max_length_name} "
            f"{lm.max_length}; truncate the prompt or generate fewer tokens."
        )
    if do_sample and (rng is None or num_beams > 1):
        raise ValueError("do_sample needs rng=jax.random.key(seed) and num_beams=1 (beam sampling is not supported).")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}.")
    if not 0.0 < top_p <= 1.0 or not temperature > 0.0:
        raise ValueError(f"need 0 < top_p <= 1 and temperature > 0, got {top_p} and {temperature}.")


def _left_align(input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Move each row's padding to the left (a stable sort on the mask): every prompt ends at one slot."""
    order = jnp.argsort(attention_mask, axis=1, stable=True)
    return jnp.take_along_axis(input_ids, order, axis=1), jnp.take_along_axis(attention_mask, order, axis=1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(lm: CausalLM, plan: Plan, params, input_ids, attention_mask, knobs, key):
    input_ids, attention_mask = _left_align(input_ids, attention_mask)
    batch, prompt_len = input_ids.shape
    total = prompt_len + plan.max_new_tokens
    # Unwritten slots are hidden by causality, so the cache mask is the prompt's mask followed by ones.
    cache_mask = jnp.concatenate([attention_mask, jnp.ones((batch, plan.max_new_tokens), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    logits, cache = lm.logits(params, input_ids, positions, lm.init_cache(batch, total), cache_mask, 0)
    # The whole sequence, prompt included, as transformers keeps it (no-repeat-ngram may look at the prompt too).
    sequence = jnp.concatenate([input_ids, jnp.full((batch, plan.max_new_tokens), plan.pad, jnp.int32)], axis=1)
    cache_mask, positions = (jnp.repeat(x, plan.num_beams, axis=0) for x in (cache_mask, positions))
    step_params = repeat_rows(params, plan.num_beams)  # a mixed batch's adapters follow their prompts' beams

    def step(tokens, cache, index):
        pos = positions[:, -1] + 1 + (index - prompt_len)
        return lm.logits(step_params, tokens[:, None], pos[:, None], cache, cache_mask, index)

    return search(plan, knobs, step, logits, cache, sequence, prompt_len, key)


def search(
    plan: Plan,
    knobs: Mapping[str, jax.Array],
    step: Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]],
    logits: jax.Array,
    cache: Any,
    sequence: jax.Array,
    prompt_len: int,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array | None]:
    """The decoding loop after the prefill, for any model (encoder-decoders too: seq2seq_generate).

    step(tokens (rows,), cache, slot) -> (float32 logits (rows, vocab), cache) feeds one token per row at
    cache slot `slot`; rows = batch * num_beams. `logits` and `cache` come from the prefill of the batch (one
    row per prompt; beams copy them), `sequence` (batch, prompt_len + max_new_tokens) holds the prompt then
    pad. Returns (tokens (batch, max_new_tokens), beam scores (batch,) or None without beams).
    """
    if plan.num_beams == 1:
        return _greedy_or_sample(plan, knobs, step, logits, cache, sequence, prompt_len, key), None
    cache, logits = jax.tree.map(lambda x: jnp.repeat(x, plan.num_beams, axis=0), (cache, logits))
    return _beams(plan, knobs["length_penalty"], step, logits, cache, sequence, prompt_len)


# ------------------------------------------------------------------------------------------------------------
# Logits processors (transformers' order: no-repeat-ngram, then temperature, top-k, top-p)
# ------------------------------------------------------------------------------------------------------------


def _no_repeat_ngram(scores: jax.Array, sequence: jax.Array, length: jax.Array, n: int, first: int = 0) -> jax.Array:
    """-inf for every token that would complete an n-gram already in sequence[:, first:length] (rows, total):
    first=0 counts the prompt's n-grams too (transformers), first=prompt length the continuation's only."""
    if n <= 0:
        return scores
    rows, total = sequence.shape
    starts = jnp.arange(total - n + 1)
    windows = sequence[:, starts[:, None] + jnp.arange(n - 1)[None, :]]  # (rows, starts, n - 1)
    tail = jax.lax.dynamic_slice_in_dim(sequence, length - (n - 1), n - 1, axis=1)
    counted = (starts >= first) & (starts + n <= length)
    seen = jnp.all(windows == tail[:, None, :], axis=-1) & counted[None, :] & (length >= n)
    banned = jnp.zeros(scores.shape, bool).at[jnp.arange(rows)[:, None], sequence[:, starts + n - 1]].max(seen)
    return jnp.where(banned, -jnp.inf, scores)


def _ngram_start(plan: Plan, prompt_len: int) -> int:
    """Where counted n-grams may start: the (left-aligned) prompt's first slot, or the continuation's."""
    return 0 if plan.ngram_over_prompt else prompt_len


def _sample_filter(scores: jax.Array, knobs: Mapping[str, jax.Array]) -> jax.Array:
    """Temperature, then top-k (keep the k best, ties included), then top-p (the smallest set whose probability
    exceeds top_p, at least one token), as TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper."""
    scores = scores / knobs["temperature"]
    ascending = jnp.sort(scores, axis=-1)
    vocab = scores.shape[-1]
    k = jnp.clip(knobs["top_k"], 1, vocab)
    kth = jnp.take_along_axis(ascending, jnp.broadcast_to(vocab - k, (scores.shape[0], 1)), axis=-1)
    scores = jnp.where((knobs["top_k"] > 0) & (scores < kth), -jnp.inf, scores)
    ascending = jnp.where((knobs["top_k"] > 0) & (ascending < kth), -jnp.inf, ascending)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = (cumulative <= 1.0 - knobs["top_p"]).at[:, -1].set(False)
    first_kept = jnp.argmin(removed, axis=-1)[:, None]  # removed is a prefix of the ascending order
    threshold = jnp.take_along_axis(ascending, first_kept, axis=-1)
    return jnp.where(scores < threshold, -jnp.inf, scores)


def _is_eos(token: jax.Array, eos: tuple[int, ...]) -> jax.Array:
    return functools.reduce(jnp.logical_or, [token == e for e in eos], jnp.zeros(token.shape, bool))


# ------------------------------------------------------------------------------------------------------------
# Greedy and sampling
# ------------------------------------------------------------------------------------------------------------


def _greedy_or_sample(plan: Plan, knobs, step, logits, cache, sequence, prompt_len, key) -> jax.Array:
    batch = sequence.shape[0]

    def keep_going(state):
        i, _, _, _, done, _ = state
        return (i < plan.max_new_tokens) & ~jnp.all(done)

    def one_step(state):
        i, sequence, logits, cache, done, key = state
        length = prompt_len + i
        scores = _no_repeat_ngram(logits, sequence, length, plan.no_repeat_ngram_size, _ngram_start(plan, prompt_len))
        if plan.do_sample:
            key, draw = jax.random.split(key)
            token = jax.random.categorical(draw, _sample_filter(scores, knobs), axis=-1)
        else:
            token = jnp.argmax(scores, axis=-1)
        token = jnp.where(done, plan.pad, token.astype(jnp.int32))
        sequence = jax.lax.dynamic_update_slice_in_dim(sequence, token[:, None], length, axis=1)
        done = done | _is_eos(token, plan.eos)
        # The last step's logits go unused; its write lands in the cache's last slot, still in bounds.
        logits, cache = step(token, cache, length)
        return i + 1, sequence, logits, cache, done, key

    state = (jnp.int32(0), sequence, logits, cache, jnp.zeros((batch,), bool), key)
    return jax.lax.while_loop(keep_going, one_step, state)[1][:, prompt_len:]


# ------------------------------------------------------------------------------------------------------------
# Beam search: transformers' vectorised `_beam_search`, step for step
# ------------------------------------------------------------------------------------------------------------


class Beams(NamedTuple):
    """Beam-search state; scores are summed log-probs (running) or length-penalised (finished)."""

    running: jax.Array  # (batch, beams, total) sequences of the live beams, prompt included
    running_scores: jax.Array  # (batch, beams)
    finished: jax.Array  # (batch, beams, total) best finished hypotheses, best first
    finished_scores: jax.Array  # (batch, beams)
    is_finished: jax.Array  # (batch, beams) whether that slot holds a real hypothesis
    improvable: jax.Array  # (batch, 1) could a live beam still beat the worst finished one
    hits: jax.Array  # (batch, candidates) which of the last step's candidates ended (eos or length)
    cache: Any  # the KV cache, rows (batch * beams)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x (batch, beams, ...) at index (batch, n) -> (batch, n, ...)."""
    return jnp.take_along_axis(x, index.reshape(*index.shape, *([1] * (x.ndim - 2))), axis=1)


def _beams(plan: Plan, length_penalty, step, logits, cache, sequence, prompt_len):
    batch, total = sequence.shape
    k, steps = plan.num_beams, plan.max_new_tokens
    candidates = max(2, 1 + len(plan.eos)) * k
    stop_when_full, never = plan.early_stopping is True, plan.early_stopping == "never"
    batch_offset = (jnp.arange(batch) * k)[:, None]

    def advance(state: Beams, logits, i) -> Beams:
        length = prompt_len + i
        rows = state.running.reshape(batch * k, total)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        log_probs = _no_repeat_ngram(log_probs, rows, length, plan.no_repeat_ngram_size, _ngram_start(plan, prompt_len))
        log_probs = log_probs.reshape(batch, k, -1) + state.running_scores[:, :, None]
        vocab = log_probs.shape[-1]
        top_scores, top_index = jax.lax.top_k(log_probs.reshape(batch, k * vocab), candidates)
        origin, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        top_sequences = _gather(state.running, origin)
        top_sequences = jax.lax.dynamic_update_slice_in_dim(top_sequences, token[:, :, None], length, axis=2)
        hits = jnp.full(token.shape, i + 1 >= steps) | _is_eos(token, plan.eos)  # the length limit ends all

        # Running: the best k candidates that did not just finish; the cache follows the beams they came from.
        alive_scores = top_scores + hits * _NEG
        keep = jax.lax.top_k(alive_scores, k)[1]
        running, running_scores = _gather(top_sequences, keep), _gather(alive_scores, keep)
        cache_rows = (_gather(origin, keep) + batch_offset).reshape(-1)
        cache = jax.tree.map(lambda x: x[cache_rows], state.cache)

        # Finished: candidates among the top k that just finished join the pool if they beat it.
        just_finished = hits & (jnp.arange(candidates) < k)[None, :]
        scores = top_scores / (i + 1.0) ** length_penalty
        full = jnp.all(state.is_finished, axis=-1, keepdims=True) & stop_when_full
        scores = scores + full * _NEG + (~state.improvable) * _NEG + (~just_finished) * _NEG
        merged_scores = jnp.concatenate([state.finished_scores, scores], axis=1)
        pool = jax.lax.top_k(merged_scores, k)[1]
        finished = _gather(jnp.concatenate([state.finished, top_sequences], axis=1), pool)
        is_finished = _gather(jnp.concatenate([state.is_finished, just_finished], axis=1), pool)
        finished_scores = _gather(merged_scores, pool)

        # Could a running beam still beat the worst finished one? (transformers' _check_early_stop_heuristic)
        best_length = jnp.where(never & (length_penalty > 0), steps, i + 1).astype(jnp.float32)
        best_running = running_scores[:, :1] / best_length**length_penalty
        worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), _NEG)
        improvable = state.improvable & jnp.any(best_running > worst, axis=-1, keepdims=True)
        return Beams(running, running_scores, finished, finished_scores, is_finished, improvable, hits, cache)

    def keep_going(carry):
        i, state = carry
        open_beams = ~(jnp.all(state.is_finished) & stop_when_full)
        return (i < steps) & jnp.any(state.improvable) & open_beams & ~jnp.all(state.hits)

    def one_step(carry):
        i, state = carry
        token = state.running[:, :, prompt_len + i - 1].reshape(-1)
        logits, cache = step(token, state.cache, prompt_len + i - 1)
        return i + 1, advance(state._replace(cache=cache), logits, i)

    beams = jnp.repeat(sequence[:, None, :], k, axis=1)
    state = Beams(
        running=beams,
        running_scores=jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(_NEG),  # only beam 0 is live at first
        finished=beams,
        finished_scores=jnp.full((batch, k), _NEG, jnp.float32),
        is_finished=jnp.zeros((batch, k), bool),
        improvable=jnp.ones((batch, 1), bool),
        hits=jnp.zeros((batch, candidates), bool),
        cache=cache,
    )
    _, state = jax.lax.while_loop(keep_going, one_step, (jnp.int32(1), advance(state, logits, 0)))
    # Unwritten slots hold pad, so whatever follows a finished beam's eos is already pad.
    return state.finished[:, 0, prompt_len:], state.finished_scores[:, 0]


def module_logits(module: Any) -> Callable[..., tuple[jax.Array, Any]]:
    """A `CausalLM.logits` for a causal-lm module called as GPT-2's and Llama's are: (input_ids, attention_mask,
    position_ids=, cache=, cache_index=, last_logits_only=True) -> {"logits", "cache", ...}.

    `last_logits_only` sends only the last position through the LM head: a prompt's (length x vocab) logits are
    never computed, which for a long prompt and a 50k vocabulary is most of the prefill's memory.
    """

    def logits(
        params: Mapping[str, Any],
        tokens: jax.Array,
        positions: jax.Array,
        cache: Any,
        mask: jax.Array,
        index: jax.Array | int,
    ):
        out = module.apply(
            {"params": params}, tokens, mask, position_ids=positions, cache=cache, cache_index=index,
            last_logits_only=True,
        )  # fmt: skip
        return out["logits"][:, -1].astype(jnp.float32), out["cache"]

    return logits
