"""GPT-2 (Radford et al. 2019) in Flax, loading Hugging Face checkpoints; the paper's E2E NLG model.

Matches transformers' GPT2Model / GPT2LMHeadModel / GPT2ForSequenceClassification: learned positions,
pre-LN blocks, one fused `c_attn` kernel for q|k|v, gelu_new MLP, final `ln_f`, LM head tied to `wte`. HF
stores every projection as a Conv1D whose weight is already (d_in, d_out), so kernels load untransposed.

`c_attn` is a `Dense` with slices ('q', 'k', 'v'): LoRA can adapt the q and v thirds on their own, as the
paper did with loralib's MergedLinear.

`generate` (lora_jax.models.causal_generate) is greedy decoding over the fixed-size KV cache of `init_cache`.
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
import numpy as np

from lora_jax.layers import Dense, Dropout, LayerNorm
from lora_jax.models.causal_generate import generate  # noqa: F401  (re-exported: gpt2.generate)
from lora_jax.models.common import (
    ACTIVATIONS,
    abstract_params,
    attend,
    attention_scores,
    causal_cache_mask,
    check_merged,
    check_task,
    dense,
    empty_cache,
    hf_fields,
    hf_key,
    label_maps,
    layer_norm,
    masked_softmax,
    maybe_remat,
    num_labels_from_hf,
    unflatten,
    write_cache,
)
from lora_jax.tree import leaf_paths

MODEL_TYPES = ("gpt2",)
LORA_TARGETS = {
    "q": "attn.c_attn.q",
    "k": "attn.c_attn.k",
    "v": "attn.c_attn.v",
    "o": "attn.c_proj",
    "mlp": "mlp.c_fc|mlp.c_proj",
}
FUSED = {"c_attn": ("q", "k", "v")}
TASKS = ("base", "sequence-classification", "causal-lm")
ARCHITECTURES = {
    "base": "GPT2Model",
    "sequence-classification": "GPT2ForSequenceClassification",
    "causal-lm": "GPT2LMHeadModel",
}
Cache = list  # one {"k", "v"} dict of (batch, max_length, heads, head_dim) arrays per layer


@dataclasses.dataclass(frozen=True)
class Config:
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
    dtype: Any = "float32"  # compute dtype
    param_dtype: Any = "float32"
    remat: bool | str = False

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


_HF_FIELDS = hf_fields(Config)


def _check_task(task: str) -> None:
    check_task(task, TASKS, "GPT-2")


def config_from_hf(hf: Mapping[str, Any], task: str, num_labels: int | None = None) -> Config:
    """A Config from a transformers config.json dict (GPT2Config defaults fill what it leaves out)."""
    _check_task(task)
    if hf.get("model_type", "gpt2") not in MODEL_TYPES:
        raise ValueError(f"model_type {hf.get('model_type')!r} is not GPT-2; pick the model family that matches.")
    if hf.get("add_cross_attention"):
        raise ValueError("GPT-2 with cross-attention is not supported; use a decoder-only checkpoint.")
    values = {name: hf[name] for name in _HF_FIELDS if name in hf}
    for name in ("bos_token_id", "eos_token_id"):
        if isinstance(values.get(name), list):  # HF allows several; greedy decoding here stops on the first
            values[name] = values[name][0]
    values["num_labels"] = int(num_labels_from_hf(hf, num_labels))
    return Config(**values)


def config_to_hf(config: Config, task: str) -> dict[str, Any]:
    """A config.json dict that transformers loads as the matching GPT-2 class."""
    _check_task(task)
    hf = {"model_type": "gpt2", "architectures": [ARCHITECTURES[task]], "tie_word_embeddings": True}
    hf.update({name: getattr(config, name) for name in _HF_FIELDS if name != "num_labels"})
    hf.update(label_maps(config.num_labels))
    hf["torch_dtype"] = str(jnp.dtype(config.param_dtype))
    return hf


# ------------------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    config: Config
    layer_idx: int

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, kv: dict | None, cache_index):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        batch, length, _ = x.shape
        qkv = dense(cfg, 3 * cfg.n_embd, "c_attn", cfg.initializer_range)(x, deterministic)
        q, k, v = (t.reshape(batch, length, cfg.n_head, cfg.head_dim) for t in jnp.split(qkv, 3, axis=-1))
        if kv is not None:  # write this call's keys/values into the cache, attend over all of it
            kv = write_cache(kv, k, v, cache_index)
            k, v = kv["k"], kv["v"]

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
    def __call__(self, x, deterministic: bool):
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
    def __call__(self, x, mask, deterministic: bool, kv: dict | None, cache_index):
        h, kv = Attention(self.config, self.layer_idx, name="attn")(
            _layer_norm(self.config, "ln_1")(x), mask, deterministic, kv, cache_index
        )
        x = x + h
        x = x + MLP(self.config, name="mlp")(_layer_norm(self.config, "ln_2")(x), deterministic)
        return x, kv


class Layers(nn.Module):
    """The stack `h`, its blocks named 0..n_layer-1 so param paths read as HF's `h.3.attn.c_attn`."""

    config: Config

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, cache: Cache | None, cache_index):
        block = maybe_remat(Block, self.config.remat, deterministic_argnum=3)
        new_cache = []
        for i in range(self.config.n_layer):
            x, kv = block(self.config, i, name=str(i))(
                x, mask, deterministic, None if cache is None else cache[i], cache_index
            )
            new_cache.append(kv)
        return x, (None if cache is None else new_cache)


class GPT2Model(nn.Module):
    config: Config

    def setup(self) -> None:
        cfg = self.config
        embed = functools.partial(
            nn.Embed,
            features=cfg.n_embd,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nn.initializers.normal(cfg.initializer_range),
        )
        self.wte = embed(cfg.vocab_size)
        self.wpe = embed(cfg.n_positions)
        self.drop = Dropout(cfg.embd_pdrop)
        self.h = Layers(cfg)
        self.ln_f = _layer_norm(cfg, "ln_f")

    def __call__(self, input_ids, attention_mask, token_type_ids, position_ids, deterministic, cache, cache_index):
        if position_ids is None:
            position_ids = cache_index + jnp.arange(input_ids.shape[1])[None, :]
        mask = causal_cache_mask(input_ids.shape, attention_mask, cache, cache_index)

        x = self.wte(input_ids) + self.wpe(position_ids)
        if token_type_ids is not None:  # HF embeds token types with the token table
            x = x + self.wte(token_type_ids)
        x = self.drop(x, deterministic=deterministic)
        x, cache = self.h(x, mask, deterministic, cache, cache_index)
        return self.ln_f(x), cache


class GPT2(nn.Module):
    """GPT-2 with the head of `task`; returns {"last_hidden_state", "logits" (if a head), "cache" (if given)}.

    With `cache` (from `init_cache`), the call writes its keys/values at slots cache_index.. and
    `attention_mask` covers the whole cache, shape (batch, max_length).
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
    ) -> dict[str, Any]:
        cfg = self.config
        transformer = GPT2Model(cfg, name="transformer")
        hidden, cache = transformer(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic, cache, cache_index
        )
        out = {"last_hidden_state": hidden}
        if cache is not None:
            out["cache"] = cache
        if self.task == "causal-lm":
            out["logits"] = transformer.wte.attend(hidden)
        elif self.task == "sequence-classification":
            # HF pools the rightmost token that is not pad_token_id; without one we use the attention mask.
            if cfg.pad_token_id is not None:
                real = input_ids != cfg.pad_token_id
            elif attention_mask is not None:
                real = attention_mask.astype(bool)
            else:
                real = jnp.ones(input_ids.shape, bool)
            last = jnp.argmax(jnp.arange(input_ids.shape[1]) * real, axis=-1)
            pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
            out["logits"] = Dense(
                cfg.num_labels,
                use_bias=False,
                dtype=jnp.dtype(cfg.dtype),
                param_dtype=jnp.dtype(cfg.param_dtype),
                kernel_init=nn.initializers.normal(cfg.initializer_range),
                name="score",
            )(pooled)
        return out


def build(config: Config, task: str) -> GPT2:
    _check_task(task)
    return GPT2(config, task)


def init_cache(config: Config, batch_size: int, max_length: int) -> Cache:
    """An empty KV cache of fixed size, in the compute dtype."""
    return empty_cache(config.n_layer, batch_size, max_length, config.n_head, config.head_dim, config.dtype)


# ------------------------------------------------------------------------------------------------------------
# Checkpoint conversion (HF names: Conv1D weights are (d_in, d_out), so only the Linear `score` is transposed)
# ------------------------------------------------------------------------------------------------------------

_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old checkpoints, not weights
_HEADS = ("lm_head", "score", "multiple_choice_head")


def params_from_hf(
    state: Mapping[str, np.ndarray], config: Config, task: str, seed: int = 0
) -> tuple[dict[str, Any], list[str]]:
    """Flax params from an HF state dict (GPT2Model keys with or without `transformer.`, or a headed model's).

    A head the checkpoint lacks (or has with another shape) is initialised as HF would, N(0,
    initializer_range), from `seed`, and its path returned in the second value. The tied `lm_head.weight` is
    ignored.
    """
    _check_task(task)
    body, heads = {}, {}
    for key, value in state.items():
        if key.endswith(_BUFFERS):
            continue
        if key.split(".", 1)[0] in _HEADS:
            heads[key] = value
        else:
            body[key.removeprefix("transformer.")] = value

    param_dtype = jnp.dtype(config.param_dtype)
    rng = jax.random.key(seed)
    flat: dict[str, Any] = {}
    new = []
    used = set()
    for path, spec in abstract_params(build(config, task), jnp.zeros((1, 1), jnp.int32)).items():
        if path.startswith("transformer."):
            key = hf_key(path.removeprefix("transformer."))
            if key not in body:
                raise ValueError(f"Checkpoint has no {key!r}; is it a GPT-2 checkpoint matching this config?")
            value = np.asarray(body[key])
            used.add(key)
        else:  # the score head: torch Linear, (out, in)
            key = hf_key(path)
            value = heads.get(key)
            value = None if value is None else np.asarray(value).T
            if value is None or value.shape != spec.shape:
                head_rng = jax.random.fold_in(rng, len(new))
                value = config.initializer_range * jax.random.normal(head_rng, spec.shape, jnp.float32)
                new.append(path)
        if value.shape != spec.shape:
            raise ValueError(f"{key}: checkpoint shape {value.shape} != model shape {spec.shape}; fix the config.")
        flat[path] = jnp.asarray(value, param_dtype)
    unexpected = sorted(set(body) - used)
    if unexpected:
        raise ValueError(f"Checkpoint weights {unexpected[:5]} have no place in lora_jax's GPT-2; wrong family?")
    return unflatten(flat), new


def params_to_hf(params: Mapping[str, Any], config: Config, task: str) -> dict[str, np.ndarray]:
    """An HF state dict (torch layout) for the model of `task`; `lm_head.weight` is a copy of wte."""
    _check_task(task)
    check_merged(params)
    paths = leaf_paths(params)
    prefix = "" if task == "base" else "transformer."
    state = {}
    for path, value in paths:
        value = np.asarray(jax.device_get(value))
        if path.startswith("transformer."):
            state[prefix + hf_key(path.removeprefix("transformer."))] = value
        elif task == "sequence-classification" and path.startswith("score."):
            state[hf_key(path)] = value.T
    if task == "causal-lm":
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state
