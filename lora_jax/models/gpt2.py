"""GPT-2 (Radford et al. 2019) in Flax, loading Hugging Face checkpoints; the paper's E2E NLG model.

Matches transformers' GPT2Model / GPT2LMHeadModel / GPT2ForSequenceClassification: learned positions,
pre-LN blocks, one fused `c_attn` kernel for q|k|v, gelu_new MLP, final `ln_f`, LM head tied to `wte`. HF
stores every projection as a Conv1D whose weight is already (d_in, d_out), so kernels load untransposed.

`c_attn` is a `Dense` with slices ('q', 'k', 'v'): LoRA can adapt the q and v thirds on their own, as the
paper did with loralib's MergedLinear.

`generate` decodes (greedy, sampling, beam search: lora_jax.models.generate) over the fixed-size KV cache of
`init_cache`; `causal_lm(module)` is what that code needs from a GPT-2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.layers import Dense, Dropout, LayerNorm
from lora_jax.models import generate as decoding
from lora_jax.models.common import (
    ACTIVATIONS,
    CachedLayers,
    attend,
    attention_scores,
    causal_cache_mask,
    check_positions,
    decoder_outputs,
    dense,
    empty_cache,
    heads_first,
    layer_norm,
    masked_softmax,
    write_cache,
)
from lora_jax.models.spec import FamilySpec, ModelConfig
from lora_jax.prefix import Embed, kv_prefix_length, with_kv_prefix

LORA_TARGETS = {
    "q": "attn.c_attn.q",
    "k": "attn.c_attn.k",
    "v": "attn.c_attn.v",
    "o": "attn.c_proj",
    "mlp": "mlp.c_fc|mlp.c_proj",
}
FUSED = {"c_attn": ("q", "k", "v")}
ARCHITECTURES = {
    "base": "GPT2Model",
    "sequence-classification": "GPT2ForSequenceClassification",
    "causal-lm": "GPT2LMHeadModel",
}
Cache = list  # one {"k", "v"} dict of (batch, max_length, heads, head_dim) arrays per layer


@dataclasses.dataclass(frozen=True)
class Config(ModelConfig):
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False  # kept for round trips; scores are always softmaxed in float32
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    num_labels: int = 2

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}; fix the config.")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"Unsupported activation_function {self.activation_function!r}; use one of {sorted(ACTIVATIONS)}."
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


def _read_config(hf: Mapping[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    if hf.get("add_cross_attention"):
        raise ValueError("GPT-2 with cross-attention is not supported; use a decoder-only checkpoint.")
    return values


# ------------------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    config: Config
    layer_idx: int

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array, deterministic: bool, kv: dict | None, cache_index: jax.Array | int
    ):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        batch, length, _ = x.shape
        qkv = dense(cfg, 3 * cfg.n_embd, "c_attn", cfg.initializer_range)(x, deterministic)
        q, k, v = (t.reshape(batch, length, cfg.n_head, cfg.head_dim) for t in jnp.split(qkv, 3, axis=-1))
        k, v = heads_first(k), heads_first(v)
        if kv is not None:  # write this call's keys/values into the cache, attend over all of it
            kv = write_cache(kv, k, v, cache_index)
            k, v = kv["k"], kv["v"]
        k, v, mask = with_kv_prefix(self, k, v, mask)

        scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        scores = attention_scores(q, k) * scale
        probs = masked_softmax(scores, mask, dtype)  # a left-pad query sees no key: a uniform row, unused
        probs = Dropout(cfg.attn_pdrop)(probs, deterministic=deterministic)
        out = attend(probs, v.astype(dtype)).reshape(batch, length, cfg.n_embd)
        out = dense(cfg, cfg.n_embd, "c_proj", _residual_std(cfg))(out, deterministic)
        return Dropout(cfg.resid_pdrop)(out, deterministic=deterministic), kv


class MLP(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool):
        cfg = self.config
        h = dense(cfg, cfg.inner_dim, "c_fc", cfg.initializer_range)(x, deterministic)
        h = ACTIVATIONS[cfg.activation_function](h)
        h = dense(cfg, cfg.n_embd, "c_proj", _residual_std(cfg))(h, deterministic)
        return Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)


def _residual_std(cfg: Config) -> float:
    """GPT-2's residual-scaled init, for the projections that feed the residual stream."""
    return cfg.initializer_range / math.sqrt(2 * cfg.n_layer)


def _layer_norm(cfg: Config, name: str) -> LayerNorm:
    return layer_norm(cfg, cfg.layer_norm_epsilon, name)


class Block(nn.Module):
    config: Config
    layer_idx: int

    @nn.compact
    def __call__(
        self, x: jax.Array, kv: dict | None, mask: jax.Array, cache_index: jax.Array | int, deterministic: bool
    ):
        h, kv = Attention(self.config, self.layer_idx, name="attn")(
            _layer_norm(self.config, "ln_1")(x), mask, deterministic, kv, cache_index
        )
        x = x + h
        x = x + MLP(self.config, name="mlp")(_layer_norm(self.config, "ln_2")(x), deterministic)
        return x, kv


class GPT2Model(nn.Module):
    config: Config

    def setup(self) -> None:
        cfg = self.config
        embed = functools.partial(
            Embed,
            features=cfg.n_embd,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nn.initializers.normal(cfg.initializer_range),
        )
        self.wte = embed(cfg.vocab_size)
        self.wpe = embed(cfg.n_positions)
        self.drop = Dropout(cfg.embd_pdrop)
        self.h = CachedLayers(Block, cfg, cfg.n_layer)  # blocks h.0 .. h.<n_layer - 1>, as HF
        self.ln_f = _layer_norm(cfg, "ln_f")

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        token_type_ids: jax.Array | None,
        position_ids: jax.Array | None,
        deterministic: bool,
        cache: Cache | None,
        cache_index: jax.Array | int,
    ):
        if position_ids is None:
            position_ids = cache_index + jnp.arange(input_ids.shape[1])[None, :]
        start = kv_prefix_length(self.variables.get("params", {}))
        check_positions(self.config, input_ids.shape[1] if cache is None else cache[0]["k"].shape[2], start)
        position_ids = position_ids + start
        mask = causal_cache_mask(input_ids.shape, attention_mask, cache, cache_index)

        x = self.wte(input_ids) + self.wpe(position_ids)
        if token_type_ids is not None:  # HF embeds token types with the token table
            x = x + self.wte(token_type_ids)
        x = self.drop(x, deterministic=deterministic)
        x, cache = self.h(x, cache, mask, cache_index, deterministic, special=input_ids - self.config.vocab_size)
        return self.ln_f(x), cache


class GPT2(nn.Module):
    """GPT-2 with the head of `task`; returns {"last_hidden_state", "logits" (if a head), "cache" (if given)}.

    With `cache` (from `init_cache`), the call writes its keys/values at slots cache_index.. and
    `attention_mask` covers the whole cache, shape (batch, max_length). `last_logits_only` (decoding) computes
    the LM head's logits for the last position only.
    """

    config: Config
    task: str = "base"

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
        position_ids: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
        last_logits_only: bool = False,
    ) -> dict[str, Any]:
        cfg = self.config
        transformer = GPT2Model(cfg, name="transformer")
        hidden, cache = transformer(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic, cache, cache_index
        )
        score = lambda h: Dense(  # noqa: E731
            cfg.num_labels,
            use_bias=False,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            kernel_init=nn.initializers.normal(cfg.initializer_range),
            name="score",
        )(h)
        return decoder_outputs(self.task, hidden, cache, transformer.wte.attend, score, input_ids, attention_mask,
                               cfg.pad_token_id, last_logits_only)  # fmt: skip


def init_cache(config: Config, batch_size: int, max_length: int) -> Cache:
    """An empty KV cache of fixed size, in the compute dtype."""
    return empty_cache(config.n_layer, batch_size, max_length, config.n_head, config.head_dim, config.dtype)


@functools.cache
def causal_lm(module: GPT2) -> decoding.CausalLM:
    """What lora_jax.models.generate needs: logits, cache, the n_positions limit (cached: one per module, so
    its compiled decoders are reused)."""
    if module.task != "causal-lm":
        raise ValueError(f"generate needs a causal-lm model, got task {module.task!r}; build(config, 'causal-lm').")
    config = module.config
    return decoding.CausalLM(
        decoding.module_logits(module), functools.partial(init_cache, config), config.n_positions, "n_positions"
    )


def generate(module: GPT2, params: Mapping[str, Any], input_ids: jax.Array, *args: Any, **kw: Any) -> jax.Array:
    """`lora_jax.models.generate.generate` for a GPT-2 module (same arguments after the params)."""
    return decoding.generate(causal_lm(module), params, input_ids, *args, **kw)


SPEC = FamilySpec(
    name="GPT-2",
    model_types=("gpt2",),
    config_class=Config,
    model=GPT2,
    architectures={("gpt2", task): name for task, name in ARCHITECTURES.items()},
    lora_targets=LORA_TARGETS,
    adapter_sites={"attn": r"attn\.c_proj", "mlp": r"mlp\.c_proj"},
    fused=FUSED,
    prefix="transformer",
    heads=("lm_head", "score", "multiple_choice_head"),
    conv1d=r"\.(?:c_attn|c_proj|c_fc)$",  # HF's Conv1D holds (d_in, d_out); only the Linear `score` transposes
    ignored=(r"\.attn\.(?:masked_)?bias$",),  # causal-mask buffers in old checkpoints, not weights
    tied={"lm_head.weight": "transformer.wte.weight"},
    read_config=_read_config,
    write_config=lambda config, task, hf: {**hf, "tie_word_embeddings": True},
    causal_lm=causal_lm,
    token_embedding="transformer.wte",
    layer_stack="transformer.h",
    kv_prefix=True,
)
build = SPEC.build
