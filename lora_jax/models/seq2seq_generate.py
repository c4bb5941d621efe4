"""Greedy and beam-search decoding for encoder-decoder models (T5, mT5) under jit.

The encoder runs once; the decoder runs one token per step over a fixed-size KV cache, so every shape is static:
step 0 (which also computes the cross-attention keys/values) is traced on its own and every later step is one
compiled body of a `lax.while_loop`. Decoding a test set therefore compiles once per (batch, lengths) shape.

Beam search follows transformers' vectorised `_beam_search` step for step (top 2*num_beams candidates, finished
hypotheses scored sum_logprobs / generated_length**length_penalty, the same early-stop heuristic), so
`num_beams=k, early_stopping=True` picks the same sequences as `model.generate(num_beams=k, do_sample=False,
early_stopping=True)`.

A model plugs in through `module.encode(input_ids, attention_mask)` and `module.decode(ids, encoder_hidden,
attention_mask, cache=..., cache_index=...)` (see lora_jax.models.t5) plus its family's `init_cache`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lora_jax.models.common import family_init_cache

_NEG = -1.0e9  # transformers' "impossible" score; kept identical so ties and sums match


class Beams(NamedTuple):
    """Beam-search state; scores are summed log-probs (running) or length-penalised (finished)."""

    running: jax.Array  # (batch, beams, max_new_tokens) tokens of the live beams
    running_scores: jax.Array  # (batch, beams)
    finished: jax.Array  # (batch, beams, max_new_tokens) best finished hypotheses, best first
    finished_scores: jax.Array  # (batch, beams)
    is_finished: jax.Array  # (batch, beams) whether that slot holds a real hypothesis
    improvable: jax.Array  # (batch, 1) could a live beam still beat the worst finished one
    hits: jax.Array  # (batch, 2 * beams) which of the last step's candidates ended (eos or length)
    cache: list  # the decoder's KV cache, rows (batch * beams)


def generate(
    module: Any,
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = True,
) -> jax.Array:
    """Decoded tokens, (batch, max_new_tokens), without the start token; after a row's eos comes pad.

    num_beams=1 is greedy. With beams, `length_penalty` and `early_stopping` (True, False or "never") mean what
    they mean in transformers' generate.
    """
    task = getattr(module, "task", None)
    if task != "seq2seq-lm":
        raise ValueError(f"generate needs a seq2seq-lm model, got task {task!r}; build(config, 'seq2seq-lm').")
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"need num_beams >= 1 and max_new_tokens >= 1, got {num_beams} and {max_new_tokens}.")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if num_beams == 1:
        return _greedy(module, params, input_ids, attention_mask, max_new_tokens)
    return beam_search(
        module, params, input_ids, attention_mask, max_new_tokens, num_beams, length_penalty, early_stopping
    )[0]


def eval_generator(max_new_tokens: int, num_beams: int = 1) -> Any:
    """`generate` for a trainer batch (a dict with input_ids, attention_mask): what `train.EvalSpec` takes."""

    def generate_batch(module: Any, params: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> jax.Array:
        return generate(module, params, batch["input_ids"], batch["attention_mask"], max_new_tokens, num_beams)

    return generate_batch


def _step(module, params, token, encoded, attention_mask, cache, index) -> tuple[jax.Array, list]:
    """float32 next-token logits (rows, vocab) for one token per row at slot `index`, and the updated cache."""
    out = module.apply(
        {"params": params}, token[:, None], encoded, attention_mask, cache=cache, cache_index=index, method="decode"
    )
    return out["logits"][:, -1].astype(jnp.float32), out["cache"]


@functools.partial(jax.jit, static_argnums=(0, 4))
def _greedy(module, params, input_ids, attention_mask, max_new_tokens):
    c = module.config
    batch = input_ids.shape[0]
    encoded = module.apply({"params": params}, input_ids, attention_mask, method="encode")["last_hidden_state"]
    start = jnp.full((batch,), c.decoder_start_token_id, jnp.int32)
    logits, cache = _step(
        module, params, start, encoded, attention_mask, family_init_cache(module, batch, max_new_tokens), 0
    )

    def keep_going(state):
        step, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_step(state):
        step, tokens, logits, cache, done = state
        token = jnp.where(done, c.pad_token_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tokens = tokens.at[:, step].set(token)
        if c.eos_token_id is not None:
            done = done | (token == c.eos_token_id)
        # The last step's logits are never used; its slot index is clamped so the cache write stays in bounds.
        logits, cache = _step(
            module, params, token, encoded, attention_mask, cache, jnp.minimum(step + 1, max_new_tokens - 1)
        )
        return step + 1, tokens, logits, cache, done

    tokens = jnp.full((batch, max_new_tokens), c.pad_token_id, jnp.int32)
    state = (jnp.int32(0), tokens, logits, cache, jnp.zeros((batch,), bool))
    return jax.lax.while_loop(keep_going, one_step, state)[1]


def beam_search(
    module: Any,
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = True,
) -> tuple[jax.Array, jax.Array]:
    """(best tokens (batch, max_new_tokens), their scores (batch,)), as transformers' beam search.

    `length_penalty` and `early_stopping` are data, not part of the compiled program: trying other values
    does not recompile.
    Cross-attention keys/values are computed once per beam row and then gathered with the rest of the cache;
    they are the same for every beam of a row, so gathering keeps them right at no extra cost in code.
    """
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}.")
    stop_when_full, never = early_stopping is True, early_stopping == "never"
    return _beam_search(
        module, params, input_ids, attention_mask, max_new_tokens, num_beams, length_penalty, stop_when_full, never
    )


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _beam_search(
    module, params, input_ids, attention_mask, max_new_tokens, num_beams, length_penalty, stop_when_full, never
):
    c = module.config
    batch, k, steps = input_ids.shape[0], num_beams, max_new_tokens
    candidates = 2 * k  # transformers keeps max(2, 1 + n_eos) * num_beams; one eos here
    encoded = module.apply({"params": params}, input_ids, attention_mask, method="encode")["last_hidden_state"]
    encoded, mask = jnp.repeat(encoded, k, axis=0), jnp.repeat(attention_mask, k, axis=0)
    batch_offset = (jnp.arange(batch) * k)[:, None]

    def gather(x, index):  # x: (batch, beams, ...), index: (batch, n) -> (batch, n, ...)
        return jnp.take_along_axis(x, index.reshape(*index.shape, *([1] * (x.ndim - 2))), axis=1)

    def advance(state: Beams, logits, step) -> Beams:
        """One transformers beam step: choose candidates, update running and finished beams."""
        log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, k, -1) + state.running_scores[:, :, None]
        vocab = log_probs.shape[-1]
        top_scores, top_index = jax.lax.top_k(log_probs.reshape(batch, k * vocab), candidates)
        origin, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        top_sequences = gather(state.running, origin).at[:, :, step].set(token)
        hits = jnp.full(token.shape, step + 1 >= steps)  # the length limit ends every candidate at the last step
        if c.eos_token_id is not None:
            hits = hits | (token == c.eos_token_id)

        # Running: the best k candidates that did not just finish; the cache follows the beams they came from.
        keep = jax.lax.top_k(top_scores + hits * _NEG, k)[1]
        running, running_scores = gather(top_sequences, keep), gather(top_scores + hits * _NEG, keep)
        cache_rows = (gather(origin, keep) + batch_offset).reshape(-1)
        cache = jax.tree.map(lambda x: x[cache_rows], state.cache)

        # Finished: candidates among the top k that just finished join the pool if they beat it.
        just_finished = hits & (jnp.arange(candidates) < k)[None, :]
        scores = top_scores / (step + 1.0) ** length_penalty
        full = jnp.all(state.is_finished, axis=-1, keepdims=True) & stop_when_full
        scores = scores + full * _NEG + (~state.improvable) * _NEG + (~just_finished) * _NEG
        merged_scores = jnp.concatenate([state.finished_scores, scores], axis=1)
        pool = jax.lax.top_k(merged_scores, k)[1]
        finished = gather(jnp.concatenate([state.finished, top_sequences], axis=1), pool)
        is_finished = gather(jnp.concatenate([state.is_finished, just_finished], axis=1), pool)
        finished_scores = gather(merged_scores, pool)

        # Could a running beam still beat the worst finished one? (transformers' _check_early_stop_heuristic)
        length = jnp.where(never & (length_penalty > 0), steps, step + 1).astype(jnp.float32)
        best_running = running_scores[:, :1] / length**length_penalty
        worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), _NEG)
        improvable = state.improvable & jnp.any(best_running > worst, axis=-1, keepdims=True)
        return Beams(running, running_scores, finished, finished_scores, is_finished, improvable, hits, cache)

    def keep_going(carry):
        step, state = carry
        open_beams = ~(jnp.all(state.is_finished) & stop_when_full)
        return (step < steps) & jnp.any(state.improvable) & open_beams & ~jnp.all(state.hits)

    def one_step(carry):
        step, state = carry
        token = state.running[:, :, step - 1].reshape(-1)
        logits, cache = _step(module, params, token, encoded, mask, state.cache, step)
        return step + 1, advance(state._replace(cache=cache), logits, step)

    fill = jnp.full((batch, k, steps), c.pad_token_id, jnp.int32)
    start = jnp.full((batch * k,), c.decoder_start_token_id, jnp.int32)
    logits, cache = _step(module, params, start, encoded, mask, family_init_cache(module, batch * k, steps), 0)
    state = Beams(
        running=fill,
        running_scores=jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(_NEG),  # only beam 0 is live at first
        finished=fill,
        finished_scores=jnp.full((batch, k), _NEG, jnp.float32),
        is_finished=jnp.zeros((batch, k), bool),
        improvable=jnp.ones((batch, 1), bool),
        hits=jnp.zeros((batch, candidates), bool),
        cache=cache,
    )
    _, state = jax.lax.while_loop(keep_going, one_step, (jnp.int32(1), advance(state, logits, 0)))
    # Unwritten slots of a sequence hold pad, so whatever follows a finished beam's eos is already pad.
    return state.finished[:, 0], state.finished_scores[:, 0]
