"""BERT and RoBERTa encoders (Devlin et al. 2019; Liu et al. 2019), loading Hugging Face checkpoints.

One implementation serves both: RoBERTa is BERT with different position ids (counted from padding_idx + 1 over
non-pad tokens only), no pooler, and a two-layer classification head on the <s> token. Module names mirror
transformers' so that `roberta.encoder.layer.0.attention.self.query.kernel` here is
`roberta.encoder.layer.0.attention.self.query.weight` (transposed) there, and LoRA targets, PEFT adapter keys
and checkpoint keys all translate one to one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.layers import Dense, Dropout, LayerNorm
from lora_jax.models.common import (
    ACTIVATIONS,
    Layers,
    attend,
    attention_scores,
    check_positions,
    dense,
    heads_first,
    layer_norm,
    masked_softmax,
)
from lora_jax.models.spec import FamilySpec, ModelConfig
from lora_jax.prefix import Embed, kv_prefix_length, with_kv_prefix

LORA_TARGETS = {
    "q": r"attention\.self\.query",
    "k": r"attention\.self\.key",
    "v": r"attention\.self\.value",
    "o": r"attention\.output\.dense",
    "mlp": r"intermediate\.dense|layer\.\d+\.output\.dense",
}


@dataclasses.dataclass(frozen=True)
class Config(ModelConfig):
    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None  # None: hidden_dropout_prob, as in transformers
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2

    @property
    def prefix(self) -> str:
        return self.model_type

    @property
    def has_pooler(self) -> bool:
        return self.model_type == "bert"

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}")


def _read_config(hf: Mapping[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"position_embedding_type={hf['position_embedding_type']!r} is not supported; only 'absolute'."
        )
    return values


def _write_config(config: Config, task: str, hf: dict[str, Any]) -> dict[str, Any]:
    if config.model_type == "roberta":
        hf.setdefault("bos_token_id", 0)
        hf.setdefault("eos_token_id", 2)
    return hf


# ------------------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------------------


def _dense(config: Config, features: int, name: str) -> Dense:
    return dense(config, features, name, config.initializer_range)


def _layer_norm(config: Config, name: str = "LayerNorm") -> LayerNorm:
    return layer_norm(config, config.layer_norm_eps, name)


def position_ids(config: Config, input_ids: jax.Array, start: int = 0) -> jax.Array:
    """Token positions counted from `start` (the l_p of a key/value prefix, as transformers after a cache)."""
    if config.model_type == "roberta":
        # As transformers' create_position_ids_from_input_ids: pads keep padding_idx, tokens count on from it.
        real = (input_ids != config.pad_token_id).astype(jnp.int32)
        return (jnp.cumsum(real, axis=1) + start) * real + config.pad_token_id
    return jnp.broadcast_to(start + jnp.arange(input_ids.shape[1]), input_ids.shape)


class Embeddings(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, deterministic: bool, start: int = 0):
        c = self.config
        embed = lambda n, name: Embed(
            n,
            c.hidden_size,
            embedding_init=nn.initializers.normal(c.initializer_range),
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            name=name,
        )
        x = embed(c.vocab_size, "word_embeddings")(input_ids)
        x = x + embed(c.max_position_embeddings, "position_embeddings")(position_ids(c, input_ids, start))
        x = x + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = _layer_norm(c)(x)
        return Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool):
        c = self.config
        heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim)  # (b, t, h, d)
        q = split(_dense(c, c.hidden_size, "query")(x, deterministic))
        k = heads_first(split(_dense(c, c.hidden_size, "key")(x, deterministic)))
        v = heads_first(split(_dense(c, c.hidden_size, "value")(x, deterministic)))
        k, v, mask = with_kv_prefix(self, k, v, mask[:, None, None, :])
        scores = attention_scores(q, k) / math.sqrt(head_dim)
        probs = masked_softmax(scores, mask, v.dtype)
        probs = Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        out = attend(probs, v)
        return out.reshape(*out.shape[:-2], c.hidden_size)


class AddNorm(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): transformers' BertSelfOutput and BertOutput."""

    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, deterministic: bool):
        c = self.config
        x = _dense(c, c.hidden_size, "dense")(x, deterministic)
        x = Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
        return _layer_norm(c)(x + residual)


class TransformerLayer(nn.Module):
    """One encoder layer: attention.{self, output}, intermediate.dense, output.{dense, LayerNorm}."""

    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool):
        c = self.config
        x = Attention(c, name="attention")(x, mask, deterministic)
        h = Intermediate(c, name="intermediate")(x, deterministic)
        return AddNorm(c, name="output")(h, x, deterministic)


class Attention(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool):
        a = SelfAttention(self.config, name="self")(x, mask, deterministic)
        return AddNorm(self.config, name="output")(a, x, deterministic)


class Intermediate(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool):
        c = self.config
        return ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, "dense")(x, deterministic))


class Encoder(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool, special: jax.Array | None = None):
        c = self.config
        return Layers(TransformerLayer, c, c.num_hidden_layers, name="layer")(x, mask, deterministic, special=special)


class Pooler(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool):
        return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(x[:, 0], deterministic))


class Backbone(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array, deterministic: bool):
        c = self.config
        start = kv_prefix_length(self.variables.get("params", {}))
        check_positions(c, input_ids.shape[1], start)
        x = Embeddings(c, name="embeddings")(input_ids, token_type_ids, deterministic, start)
        x = Encoder(c, name="encoder")(x, attention_mask.astype(bool), deterministic, input_ids - c.vocab_size)
        out = {"last_hidden_state": x}
        if c.has_pooler:
            out["pooler_output"] = Pooler(c, name="pooler")(x, deterministic)
        return out


class RobertaClassificationHead(nn.Module):
    """dropout -> dense -> tanh -> dropout -> out_proj, on the <s> token."""

    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool):
        c = self.config
        drop = Dropout(_classifier_dropout(c))
        x = drop(x[:, 0], deterministic=deterministic)
        x = jnp.tanh(_dense(c, c.hidden_size, "dense")(x, deterministic))
        x = drop(x, deterministic=deterministic)
        return _dense(c, c.num_labels, "out_proj")(x, deterministic)


def _classifier_dropout(c: Config) -> float:
    return c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout


class Model(nn.Module):
    """The backbone under its HF prefix ("bert"/"roberta"), plus the task's head."""

    config: Config
    task: str = "base"

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ):
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        out = Backbone(c, name=c.prefix)(input_ids, attention_mask, token_type_ids, deterministic)
        if self.task == "sequence-classification":
            x = out["last_hidden_state"]
            if c.model_type == "roberta":
                logits = RobertaClassificationHead(c, name="classifier")(x, deterministic)
            else:
                pooled = Dropout(_classifier_dropout(c))(out["pooler_output"], deterministic=deterministic)
                logits = _dense(c, c.num_labels, "classifier")(pooled, deterministic)
            out["logits"] = logits.astype(jnp.float32)
        return out


SPEC = FamilySpec(
    name="BERT/RoBERTa",
    model_types=("bert", "roberta"),
    config_class=Config,
    model=Model,
    architectures={
        (model_type, task): f"{name}{head}"
        for model_type, name in (("bert", "Bert"), ("roberta", "Roberta"))
        for task, head in (("base", "Model"), ("sequence-classification", "ForSequenceClassification"))
    },
    lora_targets=LORA_TARGETS,
    adapter_sites={"attn": r"attention\.output\.dense", "mlp": r"layer\.\d+\.output\.dense"},
    prefix=lambda config: config.prefix,
    heads=("classifier", r"(?:bert|roberta)\.pooler"),  # RoBERTa has no pooler: a RobertaModel's is not used
    renames=((r"LayerNorm\.gamma", "LayerNorm.weight"), (r"LayerNorm\.beta", "LayerNorm.bias")),  # TF-era names
    ignored=(r"position_ids$", r"^cls\.", r"^lm_head\."),  # buffers; BERT's and RoBERTa's pretraining heads
    read_config=_read_config,
    write_config=_write_config,
    token_embedding=lambda config: f"{config.prefix}.embeddings.word_embeddings",
    layer_stack=lambda config: f"{config.prefix}.encoder.layer",
    kv_prefix=True,
)
build = SPEC.build
