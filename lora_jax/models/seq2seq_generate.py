"""Greedy and beam-search decoding for encoder-decoder models (T5, mT5) under jit.

The encoder runs once; the decoder runs one token per step over a fixed-size KV cache, so every shape is static:
step 0 (which also computes the cross-attention keys/values) is traced on its own and every later step is one
compiled body of a `lax.while_loop`. Decoding a test set therefore compiles once per (batch, lengths) shape.

The loop is the decoder-only one (lora_jax.models.generate.search, transformers' greedy and vectorised beam
search step for step), with the start token as the decoder's one-token prompt, so `num_beams=k,
early_stopping=True` picks the same sequences as `model.generate(num_beams=k, do_sample=False,
early_stopping=True)`.

A model plugs in through `module.encode(input_ids, attention_mask)` and `module.decode(ids, encoder_hidden,
attention_mask, cache=..., cache_index=...)` (see lora_jax.models.t5) plus its family's `init_cache`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.models import generate as decoding
from lora_jax.models.common import family_init_cache


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
    return beam_search(
        module, params, input_ids, attention_mask, max_new_tokens, num_beams, length_penalty, early_stopping
    )[0]


def eval_generator(max_new_tokens: int, num_beams: int = 1) -> Any:
    """`generate` for a trainer batch (a dict with input_ids, attention_mask): what `train.EvalSpec` takes."""

    def generate_batch(module: Any, params: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> jax.Array:
        return generate(module, params, batch["input_ids"], batch["attention_mask"], max_new_tokens, num_beams)

    return generate_batch


def beam_search(
    module: Any,
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = True,
) -> tuple[jax.Array, jax.Array | None]:
    """(best tokens (batch, max_new_tokens), their scores (batch,); None for num_beams=1), as transformers'
    beam search.

    `length_penalty` is data, not part of the compiled program: trying other values does not recompile.
    Cross-attention keys/values are computed once per prompt in step 0 and copied to its beams with the rest of
    the cache.
    """
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}.")
    c = module.config
    eos = () if c.eos_token_id is None else (c.eos_token_id,)
    plan = decoding.Plan(max_new_tokens, eos, c.pad_token_id, False, num_beams, 0, early_stopping)
    knobs = decoding.decode_knobs(length_penalty=length_penalty)
    return _search(module, plan, params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask), knobs)


def _step(module, params, token, encoded, attention_mask, cache, index) -> tuple[jax.Array, list]:
    """float32 next-token logits (rows, vocab) for one token per row at slot `index`, and the updated cache."""
    out = module.apply(
        {"params": params}, token[:, None], encoded, attention_mask, cache=cache, cache_index=index, method="decode"
    )
    return out["logits"][:, -1].astype(jnp.float32), out["cache"]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _search(module, plan: decoding.Plan, params, input_ids, attention_mask, knobs):
    c, batch, steps = module.config, input_ids.shape[0], plan.max_new_tokens
    encoded = module.apply({"params": params}, input_ids, attention_mask, method="encode")["last_hidden_state"]
    start = jnp.full((batch,), c.decoder_start_token_id, jnp.int32)
    logits, cache = _step(module, params, start, encoded, attention_mask, family_init_cache(module, batch, steps), 0)
    encoded, mask = (jnp.repeat(x, plan.num_beams, axis=0) for x in (encoded, attention_mask))

    def step(token, cache, index):
        # The last greedy step's logits are never used; its slot is clamped so the cache write stays in bounds.
        return _step(module, params, token, encoded, mask, cache, jnp.minimum(index, steps - 1))

    # The start token is the decoder's one-token prompt; the cache holds the generated tokens' slots 0..steps-1.
    sequence = jnp.concatenate([start[:, None], jnp.full((batch, steps), c.pad_token_id, jnp.int32)], axis=1)
    return decoding.search(plan, knobs, step, logits, cache, sequence, 1, jax.random.key(0))
