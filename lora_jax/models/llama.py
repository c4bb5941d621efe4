"""Llama (Touvron et al. 2023) and the decoders that differ from it in config only, Qwen2 and Mistral, in Flax,
loading Hugging Face checkpoints.

Matches transformers' LlamaModel / LlamaForCausalLM / LlamaForSequenceClassification (and the Qwen2, Mistral
classes): pre-norm blocks with RMSNorm, rotary positions (rope_theta; rope_scaling `linear`, `llama3`),
grouped-query attention (num_key_value_heads <= num_attention_heads), a SwiGLU MLP
down(silu(gate(x)) * up(x)), a final norm and an LM head tied to the token table or not. Qwen2 puts biases on
q/k/v (not o); Llama's attention_bias puts them on all four. Sliding-window attention is not implemented, so a
config that turns it on is refused.

Every projection is an nn.Linear in HF, (out, in): kernels load transposed. Param paths mirror HF's
(`model.layers.3.self_attn.q_proj.kernel`), so LoRA targets and PEFT keys are HF's module names.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.layers import Dropout
from lora_jax.models import generate as decoding
from lora_jax.models.common import (
    ACTIVATIONS,
    CachedLayers,
    apply_rope,
    attend,
    attention_scores,
    causal_cache_mask,
    decoder_outputs,
    dense,
    empty_cache,
    heads_first,
    masked_softmax,
    rms_norm,
    rope_frequencies,
    write_cache,
)
from lora_jax.models.spec import FamilySpec, ModelConfig
from lora_jax.prefix import Embed, kv_prefix_length, with_kv_prefix

MODEL_TYPES = ("llama", "qwen2", "mistral")
LORA_TARGETS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "mlp": "mlp.gate_proj|mlp.up_proj|mlp.down_proj",
}
FUSED: dict[str, tuple[str, ...]] = {}
CLASS_PREFIX = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
CLASS_SUFFIX = {"base": "Model", "causal-lm": "ForCausalLM", "sequence-classification": "ForSequenceClassification"}
Cache = list  # one {"k", "v"} dict of (batch, max_length, kv_heads, head_dim) arrays per layer


@dataclasses.dataclass(frozen=True)
class Config(ModelConfig):
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads (multi-head attention); set after init
    head_dim: int | None = None  # None: hidden_size // num_attention_heads; set after init
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None  # config.json's dict, held as sorted (key, value) pairs so the config hashes
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: Any = 2  # an int or several (held as a tuple)
    pad_token_id: int | None = None
    num_labels: int = 2

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {list(MODEL_TYPES)}; pick its family.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}; fix the config."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"Unsupported hidden_act {self.hidden_act!r}; use one of {sorted(ACTIVATIONS)}.")
        rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling_dict)  # refuses an unknown rope type

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"


def _read_config(hf: Mapping[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """RoPE from `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5); every eos
    id kept (generation stops on any); sliding windows refused."""
    model_type = values.get("model_type", "llama")
    if hf.get("use_sliding_window") or (model_type == "mistral" and hf.get("sliding_window") is not None):
        raise ValueError(
            "sliding-window attention is not supported; set sliding_window to null (or use_sliding_window to "
            "false) in config.json, which is exact for sequences no longer than the window."
        )
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None if kind == "default" else {**rope, "rope_type": kind}
    if scaling is not None:
        scaling.pop("type", None)
    values = {**values, "rope_theta": float(theta), "rope_scaling": scaling}
    if isinstance(hf.get("eos_token_id"), list):
        values["eos_token_id"] = tuple(hf["eos_token_id"])
    if model_type == "qwen2":
        values.setdefault("max_position_embeddings", 32768)
    return values


def _write_config(config: Config, task: str, hf: dict[str, Any]) -> dict[str, Any]:
    """config.json for the matching Llama / Qwen2 / Mistral class, RoPE in both transformers 4's and 5's keys."""
    eos = config.eos_token_id
    hf = {**hf, "eos_token_id": list(eos) if isinstance(eos, tuple) else eos, "rope_scaling": config.rope_scaling_dict}
    rope = {"rope_theta": config.rope_theta, "rope_type": "default", **(config.rope_scaling_dict or {})}
    hf["rope_parameters"] = rope
    if config.model_type == "qwen2":
        hf["use_sliding_window"] = False
    if config.model_type == "mistral":
        hf["sliding_window"] = None
    return hf


# ------------------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    config: Config

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        kv: dict | None,
        cache_index: jax.Array | int,
        deterministic: bool,
    ):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        batch, length, _ = x.shape
        std = cfg.initializer_range

        def project(name: str, heads: int):
            out = dense(cfg, heads * cfg.head_dim, name, std, use_bias=cfg.qkv_bias)(x, deterministic)
            return out.reshape(batch, length, heads, cfg.head_dim)

        inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        q = apply_rope(project("q_proj", cfg.num_attention_heads), positions, inv_freq)
        k = heads_first(apply_rope(project("k_proj", cfg.num_key_value_heads), positions, inv_freq))
        v = heads_first(project("v_proj", cfg.num_key_value_heads))
        if kv is not None:  # write this call's keys/values into the cache, attend over all of it
            kv = write_cache(kv, k, v, cache_index)
            k, v = kv["k"], kv["v"]
        k, v, mask = with_kv_prefix(self, k, v, mask)

        scores = attention_scores(q, k) * cfg.head_dim**-0.5
        probs = masked_softmax(scores, mask, dtype)  # a left-pad query sees no key: a uniform row, unused
        probs = Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
        out = attend(probs, v.astype(dtype)).reshape(batch, length, cfg.num_attention_heads * cfg.head_dim)
        return dense(cfg, cfg.hidden_size, "o_proj", std, use_bias=cfg.o_bias)(out, deterministic), kv


class MLP(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool):
        cfg = self.config
        linear = lambda features, name: dense(cfg, features, name, cfg.initializer_range, use_bias=cfg.mlp_bias)
        gate = ACTIVATIONS[cfg.hidden_act](linear(cfg.intermediate_size, "gate_proj")(x, deterministic))
        return linear(cfg.hidden_size, "down_proj")(gate * linear(cfg.intermediate_size, "up_proj")(x, deterministic))


class Block(nn.Module):
    config: Config
    layer_idx: int

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        kv: dict | None,
        positions: jax.Array,
        mask: jax.Array,
        cache_index: jax.Array | int,
        deterministic: bool,
    ):
        cfg = self.config
        h, kv = Attention(cfg, name="self_attn")(
            rms_norm(cfg, cfg.rms_norm_eps, "input_layernorm")(x), positions, mask, kv, cache_index, deterministic
        )
        x = x + h
        h = MLP(cfg, name="mlp")(rms_norm(cfg, cfg.rms_norm_eps, "post_attention_layernorm")(x), deterministic)
        return x + h, kv


class LlamaModel(nn.Module):
    config: Config

    def setup(self) -> None:
        cfg = self.config
        self.embed_tokens = Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nn.initializers.normal(cfg.initializer_range),
        )
        self.layers = CachedLayers(Block, cfg, cfg.num_hidden_layers)  # layers.0 .. as HF
        self.norm = rms_norm(cfg, cfg.rms_norm_eps, "norm")

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        position_ids: jax.Array | None,
        deterministic: bool,
        cache: Cache | None,
        cache_index: jax.Array | int,
    ):
        if position_ids is None:  # as transformers: slot numbers, padding included
            position_ids = jnp.broadcast_to(cache_index + jnp.arange(input_ids.shape[1]), input_ids.shape)
        position_ids = position_ids + kv_prefix_length(self.variables.get("params", {}))
        mask = causal_cache_mask(input_ids.shape, attention_mask, cache, cache_index)
        x, cache = self.layers(self.embed_tokens(input_ids), cache, position_ids, mask, cache_index, deterministic,
                               special=input_ids - self.config.vocab_size)  # fmt: skip
        return self.norm(x), cache


class Llama(nn.Module):
    """Llama with the head of `task`; returns {"last_hidden_state", "logits" (if a head), "cache" (if given)}.

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
        if token_type_ids is not None:
            raise ValueError(
                "Llama has no token types; drop token_type_ids (tokenizer(..., return_token_type_ids=False))."
            )
        model = LlamaModel(cfg, name="model")
        hidden, cache = model(input_ids, attention_mask, position_ids, deterministic, cache, cache_index)

        def head(features: int, name: str) -> Callable[[jax.Array], jax.Array]:
            return lambda h: dense(cfg, features, name, cfg.initializer_range, use_bias=False)(h)

        lm_head = model.embed_tokens.attend if cfg.tie_word_embeddings else head(cfg.vocab_size, "lm_head")
        return decoder_outputs(self.task, hidden, cache, lm_head, head(cfg.num_labels, "score"), input_ids,
                               attention_mask, cfg.pad_token_id, last_logits_only)  # fmt: skip


def init_cache(config: Config, batch_size: int, max_length: int) -> Cache:
    """An empty KV cache of fixed size in the compute dtype; grouped-query attention caches kv_heads only."""
    return empty_cache(
        config.num_hidden_layers, batch_size, max_length, config.num_key_value_heads, config.head_dim, config.dtype
    )


@functools.cache
def causal_lm(module: Llama) -> decoding.CausalLM:
    """What lora_jax.models.generate needs (cached: one per module, so its compiled decoders are reused)."""
    if module.task != "causal-lm":
        raise ValueError(f"generate needs a causal-lm model, got task {module.task!r}; build(config, 'causal-lm').")
    c = module.config
    return decoding.CausalLM(
        decoding.module_logits(module), functools.partial(init_cache, c), c.max_position_embeddings,
        "max_position_embeddings",
    )  # fmt: skip


def generate(module: Llama, params: Mapping[str, Any], input_ids: jax.Array, *args: Any, **kw: Any) -> jax.Array:
    """`lora_jax.models.generate.generate` for a Llama module (same arguments after the params)."""
    return decoding.generate(causal_lm(module), params, input_ids, *args, **kw)


SPEC = FamilySpec(
    name="Llama",
    model_types=MODEL_TYPES,
    config_class=Config,
    model=Llama,
    architectures={
        (model_type, task): CLASS_PREFIX[model_type] + suffix
        for model_type in MODEL_TYPES
        for task, suffix in CLASS_SUFFIX.items()
    },
    lora_targets=LORA_TARGETS,
    adapter_sites={"attn": r"self_attn\.o_proj", "mlp": r"mlp\.down_proj"},
    fused=FUSED,
    prefix="model",  # a headed model's backbone; LlamaModel's keys have none
    heads=("lm_head", "score"),
    ignored=(r"rotary_emb\.inv_freq$",),  # a buffer in old checkpoints
    tied={"lm_head.weight": "model.embed_tokens.weight"},
    read_config=_read_config,
    write_config=_write_config,
    causal_lm=causal_lm,
    token_embedding="model.embed_tokens",
    layer_stack="model.layers",
    kv_prefix=True,
)
build = SPEC.build
