"""Prefix-embedding and prefix-layer tuning, the baselines of the LoRA paper's Section 5.1 (after Li & Liang 2021).

Both insert l_p *prefix* and l_i *infix* special tokens into every input; only what those tokens are trains.

    prefix_embed (PreEmbed)  their word embeddings:                                      d_model * (l_p + l_i)
    prefix_layer (PreLayer)  their activations at the input of every one of the L layers: L * d_model * (l_p + l_i)

The special tokens have ids just past the vocabulary, V .. V + l_p + l_i - 1 (prefix first), put into the inputs by
the data side (`lora_jax.data.prefix`). The model notices them the way its Dense notices LoRA leaves: by the leaves
present when it is traced.

    <token embedding>.prefix_embed  (l_p, d)  rows for ids V .. V + l_p - 1      } read by `Embed` for ids >= V
    <token embedding>.infix_embed   (l_i, d)  rows for the next l_i ids          }
    <layer stack>.<i>.prefix_layer  (l_p, d)  what layer i reads at those tokens } written over the hidden states
    <layer stack>.<i>.infix_layer   (l_i, d)                                     } by `layer_input`, i = 1 .. L-1

So the leaves' shapes say l_p and l_i (`special_counts`), and an adapter file is the whole truth about a run.
PreLayer holds the embedding rows as well: "the activations after the embedding layer" are layer 0's input, and the
outputs of layers 0 .. L-2 are the inputs of layers 1 .. L-1, so L tables of (l_p + l_i) x d in all, the paper's
count. (Replacing the last layer's output too would change nothing any other token reads.)

Initialisation: the wrapped model must start as an ordinary one, so the special tokens start as real tokens, as Li &
Liang found works best: each is a copy of a vocabulary token drawn at random (the seed picks which), its embedding
row for PreEmbed and, for PreLayer, the activations the frozen model computes at every layer for the drawn tokens
read as a sequence. A causal model whose prefix leads the input (GPT-2 here) then starts exactly as the pretrained
model reading those real tokens; a bidirectional encoder starts close to it.

prefix_kv is prefix tuning as HF PEFT implements it (not the paper's PreLayer): no tokens enter the inputs; every
self-attention module holds the keys and values of l_p virtual tokens, which every query sees before the text's,

    <attention>.prefix_key, <attention>.prefix_value  (l_p, kv_heads * head_dim)    2 * L * kv_dim * l_p in all

and the text's positions count on from l_p, as transformers' do when PEFT hands them those keys and values as a
cache. They start as the keys and values the frozen model computes for l_p drawn vocabulary tokens (Li & Liang's
real-token init; PEFT draws them from N(0, 1)), so a causal model starts exactly as the pretrained one reading them.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.quant import is_quantized
from lora_jax.tree import combine, leaf_paths

PREFIX_EMBED, INFIX_EMBED = "prefix_embed", "infix_embed"
PREFIX_LAYER, INFIX_LAYER = "prefix_layer", "infix_layer"
PREFIX_KEY, PREFIX_VALUE = "prefix_key", "prefix_value"
EMBED_LEAVES = (PREFIX_EMBED, INFIX_EMBED)
LAYER_LEAVES = (PREFIX_LAYER, INFIX_LAYER)
KV_LEAVES = (PREFIX_KEY, PREFIX_VALUE)
PREFIX_LEAVES = EMBED_LEAVES + LAYER_LEAVES + KV_LEAVES
TOKEN_METHODS = ("prefix_embed", "prefix_layer")  # the data side inserts their special tokens
PREFIX_KV = "prefix_kv"
PREFIX_METHODS = (*TOKEN_METHODS, PREFIX_KV)
LAYER_INPUTS = "prefix_layer_inputs"  # what each layer stack sows (intermediates) for the PreLayer init
KV_INPUTS = "prefix_kv_inputs"  # what each self-attention sows for the prefix_kv init


class PrefixError(ValueError):
    """Prefix tuning that does not fit the model or the data; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    """How many special tokens: l_p before the input, l_i after its first text (the paper's l_p and l_i).

    The default, 16 in all, gives PreLayer L * d_model * 16 parameters, exactly LoRA's r = 4 on W_q and W_v
    (L * 2 * 2 * d_model * 4): the paper compares the two at equal budgets.
    """

    l_p: int = 16
    l_i: int = 0

    def __post_init__(self) -> None:
        for name in ("l_p", "l_i"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise PrefixError(f"prefix.{name} must be an integer >= 0, got {value!r}.")
        if self.l_p + self.l_i == 0:
            raise PrefixError("prefix.l_p + prefix.l_i is 0: prefix tuning needs at least one special token.")

    @property
    def num_special(self) -> int:
        return self.l_p + self.l_i


def is_prefix_leaf(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in PREFIX_LEAVES


def _rows(own: Mapping[str, Any], names: tuple[str, str]) -> jax.Array | None:
    """The prefix rows then the infix rows of one module's params, or None if it has neither."""
    parts = [own[n] for n in names if n in own]
    return None if not parts else parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _overwrite(x: jax.Array, special: jax.Array, rows: jax.Array) -> jax.Array:
    """x (batch, length, d) with row special[b, t] of `rows` wherever special >= 0."""
    picked = jnp.take(rows, jnp.clip(special, 0, rows.shape[0] - 1), axis=0).astype(x.dtype)
    return jnp.where((special >= 0)[..., None], picked, x)


# ---------------------------------------------------------------------------------------------------------------
# What the models call
# ---------------------------------------------------------------------------------------------------------------


class Embed(nn.Embed):
    """`flax.linen.Embed` that reads ids >= num_embeddings from `prefix_embed`/`infix_embed` when they are present.

    Without those leaves it is nn.Embed exactly. The LM head (`attend`) scores the vocabulary only: special tokens
    are read, never predicted. A frozen table held quantized (`lora_jax.quant.Table`) is read as it is: a lookup
    dequantizes the rows it reads, and `attend` dequantizes inside the matmul.
    """

    def setup(self) -> None:
        if self.has_variable("params", "embedding") and is_quantized(self.get_variable("params", "embedding")):
            self.embedding = self.get_variable("params", "embedding")  # no init-shape check on a quantized leaf
        else:
            super().setup()

    def _lookup(self, inputs: jax.Array) -> jax.Array:
        if is_quantized(self.embedding):
            return self.embedding.rows(inputs, self.dtype or self.embedding.dtype)
        return super().__call__(inputs)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        rows = _rows(self.variables.get("params", {}), EMBED_LEAVES)
        if rows is None:
            return self._lookup(inputs)
        special = inputs - self.num_embeddings
        x = self._lookup(jnp.where(special >= 0, 0, inputs))
        return _overwrite(x, special, rows)

    def attend(self, query: jax.Array) -> jax.Array:
        if is_quantized(self.embedding):
            return self.embedding.attend(query.astype(self.dtype or query.dtype))
        return super().attend(query)


def layer_input(stack: nn.Module, layer: str, x: jax.Array, special: jax.Array | None) -> jax.Array:
    """What layer `layer` of `stack` reads: x, with the special tokens' activations replaced by its
    `prefix_layer`/`infix_layer` rows where it has them. `special` is input_ids - vocab_size (negative for
    vocabulary tokens). Also sows x, which is how `prefix_wrap` reads real tokens' activations."""
    stack.sow("intermediates", LAYER_INPUTS, x)
    rows = _rows(stack.variables.get("params", {}).get(layer, {}), LAYER_LEAVES)
    if rows is None or special is None:
        return x
    return _overwrite(x, special, rows)


def with_kv_prefix(
    attention: nn.Module, k: jax.Array, v: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys and values (batch, heads, keys, head_dim) and mask (batch, 1 or heads, queries, keys) with the module's
    `prefix_key`/`prefix_value` rows put first and seen by every query; unchanged without those leaves. Also sows
    k and v, which is how `prefix_wrap` reads real tokens' keys and values."""
    attention.sow("intermediates", KV_INPUTS, (k, v))
    own = attention.variables.get("params", {})
    if PREFIX_KEY not in own:
        return k, v, mask
    batch, heads, _, head_dim = k.shape

    def first(rows: jax.Array, t: jax.Array) -> jax.Array:
        rows = rows.reshape(rows.shape[0], heads, head_dim).transpose(1, 0, 2).astype(t.dtype)
        return jnp.concatenate([jnp.broadcast_to(rows, (batch, *rows.shape)), t], axis=2)

    seen = jnp.ones((*mask.shape[:-1], own[PREFIX_KEY].shape[0]), bool)
    return first(own[PREFIX_KEY], k), first(own[PREFIX_VALUE], v), jnp.concatenate([seen, mask.astype(bool)], -1)


def kv_prefix_length(params: Mapping[str, Any]) -> int:
    """l_p of the prefix_kv leaves in `params` (0 without): where a model's text positions start."""
    for path, leaf in leaf_paths(params):
        if path.rsplit(".", 1)[-1] == PREFIX_KEY:
            return int(np.shape(leaf)[0])
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Wrapping
# ---------------------------------------------------------------------------------------------------------------


def _get(tree: Mapping[str, Any], path: str) -> Any:
    for name in path.split("."):
        tree = tree[name]
    return tree


def _nest(path: str, leaves: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = dict(leaves)
    for name in reversed(path.split(".")):
        tree = {name: tree}
    return tree


def _leaves(rows: jax.Array, config: PrefixConfig, kind: str) -> dict[str, jax.Array]:
    """{prefix_<kind>: the first l_p rows, infix_<kind>: the rest}, leaving out an empty one."""
    parts = {f"prefix_{kind}": rows[: config.l_p], f"infix_{kind}": rows[config.l_p :]}
    return {name: part for name, part in parts.items() if part.shape[0]}


def max_positions(model_config: Any) -> int | None:
    """How many tokens the model can read (None: no learned limit, e.g. rotary positions without a table)."""
    for name in ("n_positions", "max_position_embeddings"):
        if hasattr(model_config, name):
            limit = int(getattr(model_config, name))
            if getattr(model_config, "model_type", "") == "roberta":  # positions start at pad_token_id + 1
                limit -= model_config.pad_token_id + 1
            return limit
    return None


def prefix_paths(module: nn.Module, method: str = "prefix_embed") -> tuple[str, str]:
    """(token embedding module path, layer stack module path) of a module's family; refuses a family that does
    not offer `method`."""
    from lora_jax.models.spec import family_of

    family = family_of(module.config)
    if family.token_embedding is None or family.layer_stack is None:
        raise PrefixError(
            f"prefix tuning is defined here for encoder-only and decoder-only families (BERT/RoBERTa, DistilBERT, "
            f"DeBERTa, GPT-2, Llama), not {family.name}; use method=lora (or full, bitfit)."
        )
    if method == PREFIX_KV and not family.kv_prefix:
        raise PrefixError(
            f"method=prefix_kv (PEFT's key/value prefix) is offered for BERT/RoBERTa, GPT-2 and Llama, whose "
            f"transformers models read PEFT's prefix as a cache, not {family.name}; use method=lora (or "
            "prefix_embed, prefix_layer)."
        )
    stack = family.layer_stack
    return family.embedding_path(module.config), stack(module.config) if callable(stack) else stack


def _num_layers(stack: Mapping[str, Any]) -> int:
    return sum(1 for name in stack if str(name).isdigit())


def prefix_wrap(
    params: Mapping[str, Any], module: nn.Module, config: PrefixConfig, rng: jax.Array, method: str = "prefix_embed"
) -> dict[str, Any]:
    """Add the special tokens' leaves for `method` (one of PREFIX_METHODS), started as real tokens drawn from the
    vocabulary with `rng` (the module docstring says why); every other leaf is left as it is."""
    if method not in PREFIX_METHODS:
        raise PrefixError(f"prefix_wrap method must be one of {list(PREFIX_METHODS)}, got {method!r}.")
    if any(is_prefix_leaf(p) for p, _ in leaf_paths(params)):
        raise PrefixError("These params already carry prefix leaves; wrap the base params.")
    if method == PREFIX_KV and config.l_i:
        raise PrefixError(f"method=prefix_kv has prefix tokens only; set prefix.l_i=0 (got {config.l_i}).")
    embed_path, stack_path = prefix_paths(module, method)
    table = _get(params, embed_path)["embedding"]
    vocab_size = table.shape[0]
    limit = max_positions(module.config)
    if limit is not None and config.num_special >= limit:
        raise PrefixError(
            f"l_p + l_i = {config.num_special} special tokens leave no room for text in the model's {limit} "
            f"positions; use fewer (prefix.l_p, prefix.l_i)."
        )
    key = jax.random.fold_in(rng, zlib.crc32(b"prefix_tokens"))
    drawn = jax.random.randint(key, (config.num_special,), 0, vocab_size)
    if method == PREFIX_KV:
        return combine(params, _kv_leaves(params, module, drawn))
    additions = _nest(embed_path, _leaves(jnp.take(table, drawn, axis=0), config, "embed"))
    if method == "prefix_layer":
        inputs = _get(_sown(params, module, drawn), stack_path)[LAYER_INPUTS]  # layer 0's input, 1's, ...
        dtype = jnp.dtype(module.config.param_dtype)
        for i in range(1, _num_layers(_get(params, stack_path))):
            rows = jax.lax.stop_gradient(inputs[i][0]).astype(dtype)
            additions = combine(additions, _nest(f"{stack_path}.{i}", _leaves(rows, config, "layer")))
    return combine(params, additions)


def _sown(params: Mapping[str, Any], module: nn.Module, drawn: jax.Array) -> dict[str, Any]:
    """What the frozen model sows (its intermediates) reading the drawn tokens as one sequence: where PreLayer's
    and prefix_kv's real-token init comes from."""
    run = jax.jit(lambda p, ids: module.apply({"params": p}, ids, mutable=["intermediates"])[1])
    return run(params, drawn[None, :])["intermediates"]


def _kv_leaves(params: Mapping[str, Any], module: nn.Module, drawn: jax.Array) -> dict[str, Any]:
    """{<attention>: {prefix_key, prefix_value}}: what each self-attention computes for the drawn tokens."""
    sown = leaf_paths(_sown(params, module, drawn))
    dtype = jnp.dtype(module.config.param_dtype)
    additions: dict[str, Any] = {}
    for path, t in sown:  # <attention>.prefix_kv_inputs.0.{0: k, 1: v}, t (1, heads, l_p, head_dim)
        if f".{KV_INPUTS}." in path:
            attention, index = path.split(f".{KV_INPUTS}.")
            rows = jax.lax.stop_gradient(t[0]).transpose(1, 0, 2).reshape(t.shape[2], -1).astype(dtype)
            additions = combine(additions, _nest(attention, {KV_LEAVES[int(index[-1])]: rows}))
    return additions


def prefix_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Only the prefix leaves, as a nested dict."""
    from lora_jax.tree import filter_leaves

    return filter_leaves(params, is_prefix_leaf)


def special_counts(params: Mapping[str, Any]) -> PrefixConfig:
    """(l_p, l_i) of wrapped params, read from the embedding leaves' shapes (prefix_kv's: its keys')."""
    counts = {name: 0 for name in EMBED_LEAVES}
    for path, leaf in leaf_paths(params):
        name = path.rsplit(".", 1)[-1]
        if name in counts:
            counts[name] = int(np.shape(leaf)[0])
        elif name == PREFIX_KEY:
            counts[PREFIX_EMBED] = int(np.shape(leaf)[0])
    if not any(counts.values()):
        raise PrefixError("These params carry no prefix leaves; call prefix_wrap first.")
    return PrefixConfig(counts[PREFIX_EMBED], counts[INFIX_EMBED])


# ---------------------------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------------------------


def prefix_param_count(model_config: Any, task: str, l_p: int, l_i: int, method: str) -> int:
    """Trainable prefix parameters of `method` on a model of `model_config`, traced with jax.eval_shape (nothing
    allocated): the paper's d_model (l_p + l_i) for PreEmbed and L d_model (l_p + l_i) for PreLayer; prefix_kv's
    2 L kv_dim l_p (PEFT's num_layers * 2 * token_dim per virtual token)."""
    from lora_jax.models.spec import family_of

    family = family_of(model_config)
    module = family.build(model_config, task)
    ids = jnp.zeros((1, 2), jnp.int32)

    def wrapped() -> dict[str, Any]:
        params = module.init(jax.random.key(0), *[ids] * family.init_inputs)["params"]
        return prefix_wrap(params, module, PrefixConfig(l_p, l_i), jax.random.key(0), method)

    shapes = jax.eval_shape(wrapped)
    return sum(int(np.prod(leaf.shape)) for path, leaf in leaf_paths(shapes) if is_prefix_leaf(path))
