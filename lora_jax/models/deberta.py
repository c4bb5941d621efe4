"""DeBERTa-v2/v3 (He et al. 2021) in Flax, matching transformers' DebertaV2Model and its sequence classifier.

What sets DeBERTa apart from BERT is disentangled attention: content and position are separate vectors, and a
score is content->content + content->position (c2p) + position->content (p2c), each term scaled by
1/sqrt(d * number_of_terms). Positions are relative, i - j, looked up in one table of 2k embeddings shared by
all layers; v3 log-buckets distances beyond k/2 (`position_buckets`) and reuses the query/key projections for
the positions (`share_att_key`). The LoRA paper adapts DeBERTa XXL's query and value projections.

The param tree mirrors Hugging Face module names (`deberta.encoder.layer.0.attention.self.query_proj.kernel`),
so checkpoints, LoRA targets and PEFT adapter keys translate one to one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.layers import Dense, Dropout, LayerNorm
from lora_jax.models.common import (
    ACTIVATIONS,
    attend,
    attention_scores,
    dense,
    heads_first,
    layer_norm,
    masked_softmax,
    maybe_remat,
)
from lora_jax.models.relative_positions import relative_positions
from lora_jax.models.spec import FamilySpec, ModelConfig
from lora_jax.prefix import Embed, layer_input

LORA_TARGETS = {
    "q": "attention.self.query_proj",
    "k": "attention.self.key_proj",
    "v": "attention.self.value_proj",
    "o": "attention.output.dense",
    "mlp": r"intermediate.dense|layer.\d+.output.dense",
}


@dataclasses.dataclass(frozen=True)
class Config(ModelConfig):
    vocab_size: int = 128100
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    pad_token_id: int = 0
    embedding_size: int | None = None  # None: hidden_size (no embed_proj)
    position_biased_input: bool = True
    relative_attention: bool = False
    max_relative_positions: int = -1  # < 1: max_position_embeddings
    position_buckets: int = -1  # <= 0: no log-bucketing
    pos_att_type: tuple[str, ...] = ()
    share_att_key: bool = False
    norm_rel_ebd: str = "none"
    attention_head_size: int | None = None  # None: hidden_size // num_attention_heads
    conv_kernel_size: int = 0  # > 0: DeBERTa-v2's ConvLayer after the first layer
    conv_groups: int = 1
    conv_act: str = "tanh"
    pooler_hidden_size: int | None = None  # None: hidden_size
    pooler_hidden_act: str = "gelu"
    pooler_dropout: float = 0.0
    cls_dropout: float | None = None  # None: hidden_dropout_prob
    num_labels: int = 2

    def __post_init__(self) -> None:
        pos_att_type = self.pos_att_type
        if isinstance(pos_att_type, str):  # old configs spell it "p2c|c2p"
            pos_att_type = pos_att_type.split("|")
        object.__setattr__(self, "pos_att_type", tuple(t.strip().lower() for t in pos_att_type or ()))
        unknown = set(self.pos_att_type) - {"c2p", "p2c"}
        if unknown:
            raise ValueError(f"pos_att_type {sorted(unknown)} is not supported; use a subset of [c2p, p2c].")
        for act in (self.hidden_act, self.pooler_hidden_act, self.conv_act):
            if act not in ACTIVATIONS:
                raise ValueError(f"Activation {act!r} is not supported; use one of {sorted(ACTIVATIONS)}.")
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"num_attention_heads * attention_head_size must equal hidden_size ({self.hidden_size}); "
                "fix the config."
            )

    @property
    def head_dim(self) -> int:
        return self.attention_head_size or self.hidden_size // self.num_attention_heads

    @property
    def max_relative(self) -> int:
        positions = self.max_relative_positions
        return positions if positions >= 1 else self.max_position_embeddings

    @property
    def attention_span(self) -> int:
        """k: relative distances are clipped to [-k, k) and the shared table has 2k rows."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative

    @property
    def scale_factor(self) -> int:
        # HF counts the terms from pos_att_type even when relative_attention is off; so do we.
        return 1 + len(self.pos_att_type)


# ------------------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------------------


def _dense(config: Config, features: int, name: str, use_bias: bool = True) -> Dense:
    return dense(config, features, name, config.initializer_range, use_bias)


def _layer_norm(config: Config, name: str) -> LayerNorm:
    return layer_norm(config, config.layer_norm_eps, name)


def _embed(config: Config, num: int, features: int, name: str) -> Embed:
    return Embed(
        num,
        features,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        embedding_init=nn.initializers.normal(config.initializer_range),
        name=name,
    )


class Embeddings(nn.Module):
    config: Config

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, token_type_ids: jax.Array, mask: jax.Array, deterministic: bool
    ) -> jax.Array:
        c = self.config
        width = c.embedding_size or c.hidden_size
        x = _embed(c, c.vocab_size, width, "word_embeddings")(input_ids)
        if c.position_biased_input:
            positions = jnp.arange(input_ids.shape[-1])[None, :]
            x = x + _embed(c, c.max_position_embeddings, width, "position_embeddings")(positions)
        if c.type_vocab_size > 0:
            x = x + _embed(c, c.type_vocab_size, width, "token_type_embeddings")(token_type_ids)
        if width != c.hidden_size:
            x = _dense(c, c.hidden_size, "embed_proj", use_bias=False)(x, deterministic)
        x = _layer_norm(c, "LayerNorm")(x)
        x = x * mask[..., None].astype(x.dtype)
        return Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class DisentangledSelfAttention(nn.Module):
    config: Config

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        relative_pos: jax.Array | None,
        rel_embeddings: jax.Array | None,
        deterministic: bool,
    ) -> jax.Array:
        c = self.config
        width = c.num_attention_heads * c.head_dim
        split_heads = lambda t: t.reshape(*t.shape[:-1], c.num_attention_heads, c.head_dim)
        query_proj = _dense(c, width, "query_proj")
        key_proj = _dense(c, width, "key_proj")
        q = split_heads(query_proj(x, deterministic))  # [batch, length, heads, head_dim]
        k = split_heads(key_proj(x, deterministic))
        v = split_heads(_dense(c, width, "value_proj")(x, deterministic))

        scale = jnp.sqrt(jnp.float32(c.head_dim * c.scale_factor)).astype(q.dtype)
        scores = attention_scores(q, heads_first(k) / scale, preferred_element_type=None)

        if c.relative_attention:
            span = c.attention_span
            rel = Dropout(c.hidden_dropout_prob)(rel_embeddings, deterministic=deterministic)[: 2 * span]
            if "c2p" in c.pos_att_type:
                pos_key_proj = key_proj if c.share_att_key else _dense(c, width, "pos_key_proj")
                pos_key = split_heads(pos_key_proj(rel, deterministic))  # [2 span, heads, head_dim]
                # Query i against the embedding of distance i - j, for every key j.
                c2p = jnp.einsum("bqhd,phd->bhqp", q, pos_key)
                index = jnp.clip(relative_pos + span, 0, 2 * span - 1)
                scores = scores + jnp.take_along_axis(c2p, index[None, None], axis=-1) / scale
            if "p2c" in c.pos_att_type:
                pos_query_proj = query_proj if c.share_att_key else _dense(c, width, "pos_query_proj")
                pos_query = split_heads(pos_query_proj(rel, deterministic))
                # Key j against the embedding of distance i - j; gathered as [key, query], hence the swap.
                p2c = jnp.einsum("bkhd,phd->bhkp", k, pos_query)
                index = jnp.clip(-relative_pos + span, 0, 2 * span - 1)
                p2c = jnp.take_along_axis(p2c, index[None, None], axis=-1)
                scores = scores + jnp.swapaxes(p2c, -1, -2) / scale

        # Softmax in float32 so bf16 compute does not lose the small probabilities; a padded query sees
        # only masked keys and gets HF's uniform row.
        probs = masked_softmax(scores, mask[:, None, :, None] & mask[:, None, None, :], v.dtype)
        probs = Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = attend(probs, heads_first(v))
        return context.reshape(*context.shape[:-2], width)


class Output(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): HF's SelfOutput and Output are this same block."""

    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        x = _dense(c, c.hidden_size, "dense")(x, deterministic)
        x = Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
        return _layer_norm(c, "LayerNorm")(x + residual)


class Attention(nn.Module):
    config: Config

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        relative_pos: jax.Array | None,
        rel_embeddings: jax.Array | None,
        deterministic: bool,
    ) -> jax.Array:
        attend = DisentangledSelfAttention(self.config, name="self")
        h = attend(x, mask, relative_pos, rel_embeddings, deterministic)
        return Output(self.config, name="output")(h, x, deterministic)


class Intermediate(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        return ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, "dense")(x, deterministic))


class Layer(nn.Module):
    config: Config

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        relative_pos: jax.Array | None,
        rel_embeddings: jax.Array | None,
        deterministic: bool,
    ) -> jax.Array:
        h = Attention(self.config, name="attention")(x, mask, relative_pos, rel_embeddings, deterministic)
        up = Intermediate(self.config, name="intermediate")(h, deterministic)
        return Output(self.config, name="output")(up, h, deterministic)


class Layers(nn.Module):
    """Holds the layers as children '0', '1', ... so the tree reads `encoder.layer.3...` as in HF."""

    config: Config

    @nn.compact
    def __call__(
        self,
        index: int,
        x: jax.Array,
        mask: jax.Array,
        relative_pos: jax.Array | None,
        rel_embeddings: jax.Array | None,
        deterministic: bool,
        special: jax.Array | None = None,
    ):
        layer = maybe_remat(Layer, self.config.remat, deterministic_argnum=5)
        x = layer_input(self, str(index), x, special)  # prefix tuning's special tokens (lora_jax.prefix)
        return layer(self.config, name=str(index))(x, mask, relative_pos, rel_embeddings, deterministic)


class ConvLayer(nn.Module):
    """DeBERTa-v2's n-gram convolution over the embeddings, added to the first layer's output."""

    config: Config

    @nn.compact
    def __call__(
        self, embeddings: jax.Array, layer_output: jax.Array, mask: jax.Array, deterministic: bool
    ) -> jax.Array:
        c = self.config
        pad = (c.conv_kernel_size - 1) // 2
        out = nn.Conv(
            c.hidden_size,
            (c.conv_kernel_size,),
            padding=[(pad, pad)],
            feature_group_count=c.conv_groups,
            dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype),
            kernel_init=nn.initializers.normal(c.initializer_range),
            name="conv",
        )(embeddings)
        keep = mask[..., None].astype(out.dtype)
        out = Dropout(c.hidden_dropout_prob)(out * keep, deterministic=deterministic)
        out = ACTIVATIONS[c.conv_act](out)
        return _layer_norm(c, "LayerNorm")(layer_output + out) * keep


class Encoder(nn.Module):
    config: Config

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array, deterministic: bool, special: jax.Array | None = None
    ) -> jax.Array:
        c = self.config
        relative_pos = rel_embeddings = None
        if c.relative_attention:
            relative_pos = relative_positions(x.shape[1], c.position_buckets, c.max_relative)
            rel_embeddings = _embed(c, 2 * c.attention_span, c.hidden_size, "rel_embeddings").embedding
            if "layer_norm" in [s.strip() for s in c.norm_rel_ebd.lower().split("|")]:
                rel_embeddings = _layer_norm(c, "LayerNorm")(rel_embeddings)
            rel_embeddings = rel_embeddings.astype(jnp.dtype(c.dtype))
        layers = Layers(c, name="layer")
        embeddings = x
        for i in range(c.num_hidden_layers):
            x = layers(i, x, mask, relative_pos, rel_embeddings, deterministic, special)
            if i == 0 and c.conv_kernel_size > 0:
                x = ConvLayer(c, name="conv")(embeddings, x, mask, deterministic)
        return x


class DebertaV2Model(nn.Module):
    config: Config

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = attention_mask.astype(bool)
        x = Embeddings(self.config, name="embeddings")(input_ids, token_type_ids, mask, deterministic)
        return Encoder(self.config, name="encoder")(x, mask, deterministic, input_ids - self.config.vocab_size)


class ContextPooler(nn.Module):
    """The first token's state through dense + activation (DeBERTa's pooler has no tanh by default)."""

    config: Config

    @nn.compact
    def __call__(self, hidden: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        x = Dropout(c.pooler_dropout)(hidden[:, 0], deterministic=deterministic)
        x = _dense(c, c.pooler_hidden_size or c.hidden_size, "dense")(x, deterministic)
        return ACTIVATIONS[c.pooler_hidden_act](x)


class DebertaV2(nn.Module):
    """The backbone under `deberta`, plus pooler and classifier for sequence classification/regression."""

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
        hidden = DebertaV2Model(c, name="deberta")(input_ids, attention_mask, token_type_ids, deterministic)
        out = {"last_hidden_state": hidden}
        if self.task == "sequence-classification":
            pooled = ContextPooler(c, name="pooler")(hidden, deterministic)
            dropout = c.hidden_dropout_prob if c.cls_dropout is None else c.cls_dropout
            pooled = Dropout(dropout)(pooled, deterministic=deterministic)
            out["logits"] = _dense(c, c.num_labels, "classifier")(pooled, deterministic)
        return out


def _write_config(config: Config, task: str, hf: dict[str, Any]) -> dict[str, Any]:
    """transformers reads a null embedding_size or head size as None, not as its default: leave nulls out."""
    hf = {k: v for k, v in hf.items() if v is not None}
    hf["pos_att_type"] = list(config.pos_att_type)
    hf["pooler_hidden_size"] = config.pooler_hidden_size or config.hidden_size
    return hf


SPEC = FamilySpec(
    name="DeBERTa-v2",
    model_types=("deberta-v2",),
    config_class=Config,
    model=DebertaV2,
    architectures={
        ("deberta-v2", "base"): "DebertaV2Model",
        ("deberta-v2", "sequence-classification"): "DebertaV2ForSequenceClassification",
    },
    lora_targets=LORA_TARGETS,
    adapter_sites={"attn": r"attention\.output\.dense", "mlp": r"layer\.\d+\.output\.dense"},
    prefix="deberta",
    heads=("pooler", "classifier"),
    ignored=(r"position_ids$", r"^(?:lm_predictions|mask_predictions|cls)\."),  # buffers; pretraining heads
    write_config=_write_config,
    token_embedding="deberta.embeddings.word_embeddings",
    layer_stack="deberta.encoder.layer",
)
build = SPEC.build
