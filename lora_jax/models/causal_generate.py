"""Greedy decoding for decoder-only language models (GPT-2) under jit.

One compiled program per (batch, prompt length, max_new_tokens): the prompt fills a fixed-size KV cache in one
call (prefill), then a `lax.while_loop` runs one-token steps over that cache, so decoding a test set never
recompiles. Prompts may be padded on either side; positions count real tokens only.

A model plugs in as GPT-2 does (lora_jax.models.gpt2): called with `position_ids`, `cache` and `cache_index`, an
attention mask over the whole cache, params holding the tied token table at `transformer.wte.embedding`, and an
`init_cache(config, batch, max_length)` in its family's file. seq2seq_generate.py is the encoder-decoder
counterpart.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.models.common import family_init_cache


def _left_align(input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Move each row's padding to the left (a stable sort on the mask): every prompt ends at one slot."""
    order = jnp.argsort(attention_mask, axis=1, stable=True)
    return jnp.take_along_axis(input_ids, order, axis=1), jnp.take_along_axis(attention_mask, order, axis=1)


def generate(
    module: Any,
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    max_new_tokens: int = 64,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> jax.Array:
    """Greedy continuations, (batch, max_new_tokens); after a row's eos comes pad_token_id (default eos).

    Prompts may be padded on either side. Positions count real tokens only (HF's cumsum rule), so a padded
    prompt decodes exactly as it would alone.
    """
    if module.task != "causal-lm":
        raise ValueError(f"generate needs a causal-lm model, got task {module.task!r}; build(config, 'causal-lm').")
    if input_ids.shape[1] + max_new_tokens > module.config.n_positions:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds n_positions "
            f"{module.config.n_positions}; truncate the prompt or generate fewer tokens."
        )
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    return _generate(
        module,
        params,
        jnp.asarray(input_ids),
        jnp.asarray(attention_mask),
        max_new_tokens,
        eos_token_id,
        0 if pad is None else pad,
    )


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(module, params, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id):
    input_ids, attention_mask = _left_align(input_ids, attention_mask.astype(jnp.int32))
    batch, prompt_len = input_ids.shape
    cache = family_init_cache(module, batch, prompt_len + max_new_tokens)
    # Unwritten slots are hidden by causality, so the cache mask is the prompt's mask followed by ones.
    cache_mask = jnp.concatenate([attention_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)

    embedding = params["transformer"]["wte"]["embedding"]

    def run(ids, pos, cache, index):
        out = module.apply({"params": params}, ids, cache_mask, position_ids=pos, cache=cache, cache_index=index)
        # Logits of the last position only: the model's (batch, length, vocab) logits go unused and XLA drops
        # them, which for a long prompt and GPT-2's 50k vocabulary is most of the prefill's memory.
        hidden = out["last_hidden_state"][:, -1]
        logits = jnp.dot(hidden, embedding.T.astype(hidden.dtype))
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), out["cache"]

    next_token, cache = run(input_ids, positions, cache, 0)
    last_position = positions[:, -1]

    def keep_going(state):
        step, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_step(state):
        step, tokens, next_token, cache, done = state
        token = jnp.where(done, pad_token_id, next_token)
        tokens = tokens.at[:, step].set(token)
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        pos = (last_position + 1 + step)[:, None]
        next_token, cache = run(token[:, None], pos, cache, prompt_len + step)
        return step + 1, tokens, next_token, cache, done

    tokens = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32)
    state = (jnp.int32(0), tokens, next_token, cache, jnp.zeros((batch,), bool))
    return jax.lax.while_loop(keep_going, one_step, state)[1]
