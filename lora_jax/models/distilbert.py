"""DistilBERT (Sanh et al. 2019) in Flax, matching transformers' DistilBertModel and its sequence classifier.

DistilBERT is BERT halved by distillation: 6 layers instead of 12, no token-type embeddings, no pooler. Its
blocks are post-LayerNorm like BERT's, but the attention output goes straight from `out_lin` into
`sa_layer_norm` (no dropout there), and the classifier reads the first token through its own
`pre_classifier` (dense + ReLU + dropout `seq_classif_dropout`) before `classifier`. Param names mirror
transformers' (`distilbert.transformer.layer.0.attention.q_lin.kernel`), so checkpoints, LoRA targets and
PEFT adapter keys translate one to one.

Counting parameters, as for PEFT's seed example (distilbert-base-uncased, 2 labels, LoRA r=8 on q_lin and
v_lin, head trained in full): backbone 66,362,880 + head 592,130 (pre_classifier 768*768+768 = 590,592,
classifier 768*2+2 = 1,538) + LoRA 6 layers * 2 modules * 8*(768+768) = 147,456 gives
`count_params` = trainable 739,586 of 67,102,466. PEFT prints 67,694,596 "all params" for the same model
because `modules_to_save` keeps a frozen original copy of each trained head module beside the trained one,
and counts both: 67,102,466 + 592,130. The trainable numbers agree.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.layers import Dense, Dropout, LayerNorm
from lora_jax.models.common import (
    ACTIVATIONS,
    Layers,
    attend,
    attention_scores,
    dense,
    heads_first,
    layer_norm,
    masked_softmax,
)
from lora_jax.models.spec import FamilySpec, ModelConfig
from lora_jax.prefix import Embed

LORA_TARGETS = {
    "q": r"attention\.q_lin",
    "k": r"attention\.k_lin",
    "v": r"attention\.v_lin",
    "o": r"attention\.out_lin",
    "mlp": r"ffn\.lin1|ffn\.lin2",
}
PREFIX = "distilbert"
LAYER_NORM_EPS = 1e-12  # fixed in transformers' DistilBERT, not a config field


@dataclasses.dataclass(frozen=True)
class Config(ModelConfig):
    """transformers' DistilBertConfig field names (dim, n_layers, hidden_dim, ...), defaults included."""

    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 3072
    activation: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    seq_classif_dropout: float = 0.2
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    initializer_range: float = 0.02
    pad_token_id: int = 0
    num_labels: int = 2

    @property
    def model_type(self) -> str:
        return "distilbert"

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim}; fix config.json.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not supported; use one of {sorted(ACTIVATIONS)}.")


# ------------------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------------------


def _dense(config: Config, features: int, name: str) -> Dense:
    return dense(config, features, name, config.initializer_range)


def _layer_norm(config: Config, name: str) -> LayerNorm:
    return layer_norm(config, LAYER_NORM_EPS, name)


def sinusoidal_table(n_pos: int, dim: int) -> np.ndarray:
    """Vaswani et al.'s fixed positions, laid out as transformers' DistilBERT does (sin even, cos odd columns)."""
    angles = np.arange(n_pos)[:, None] / np.power(10000.0, 2 * (np.arange(dim) // 2) / dim)[None, :]
    table = np.empty((n_pos, dim))
    table[:, 0::2], table[:, 1::2] = np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])
    return table.astype(np.float32)


class Embeddings(nn.Module):
    """word + position embeddings, LayerNorm, dropout (no token types: DistilBERT dropped them)."""

    config: Config

    @nn.compact
    def __call__(self, input_ids: jax.Array, deterministic: bool):
        c = self.config
        normal = nn.initializers.normal(c.initializer_range)
        # A sinusoidal table is only where the weights start; transformers 5 leaves it trainable, and so do we.
        sinusoid = lambda key, shape, dtype: jnp.asarray(sinusoidal_table(*shape), dtype)
        embed = lambda n, init, name: Embed(
            n, c.dim, embedding_init=init, dtype=c.dtype, param_dtype=c.param_dtype, name=name
        )
        x = embed(c.vocab_size, normal, "word_embeddings")(input_ids)
        positions = jnp.arange(input_ids.shape[1])[None, :]
        pos_init = sinusoid if c.sinusoidal_pos_embds else normal
        x = x + embed(c.max_position_embeddings, pos_init, "position_embeddings")(positions)
        x = _layer_norm(c, "LayerNorm")(x)
        return Dropout(c.dropout)(x, deterministic=deterministic)


class MultiHeadSelfAttention(nn.Module):
    """q_lin, k_lin, v_lin -> softmax(q k^T / sqrt(d)) v -> out_lin."""

    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool):
        c = self.config
        head_dim = c.dim // c.n_heads
        split = lambda t: t.reshape(*t.shape[:-1], c.n_heads, head_dim)  # (b, t, h, d)
        q = split(_dense(c, c.dim, "q_lin")(x, deterministic))
        k = heads_first(split(_dense(c, c.dim, "k_lin")(x, deterministic)))
        v = heads_first(split(_dense(c, c.dim, "v_lin")(x, deterministic)))
        scores = attention_scores(q, k) / math.sqrt(head_dim)
        probs = masked_softmax(scores, mask[:, None, None, :], v.dtype)
        probs = Dropout(c.attention_dropout)(probs, deterministic=deterministic)
        out = attend(probs, v)
        return _dense(c, c.dim, "out_lin")(out.reshape(*out.shape[:-2], c.dim), deterministic)


class FFN(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool):
        c = self.config
        h = ACTIVATIONS[c.activation](_dense(c, c.hidden_dim, "lin1")(x, deterministic))
        h = _dense(c, c.dim, "lin2")(h, deterministic)
        return Dropout(c.dropout)(h, deterministic=deterministic)


class TransformerBlock(nn.Module):
    """attention -> sa_layer_norm(. + x) -> ffn -> output_layer_norm(. + .): post-LayerNorm, as BERT."""

    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool):
        c = self.config
        x = _layer_norm(c, "sa_layer_norm")(MultiHeadSelfAttention(c, name="attention")(x, mask, deterministic) + x)
        return _layer_norm(c, "output_layer_norm")(FFN(c, name="ffn")(x, deterministic) + x)


class Transformer(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool, special: jax.Array | None = None):
        layers = Layers(TransformerBlock, self.config, self.config.n_layers, name="layer")
        return layers(x, mask, deterministic, special=special)


class Backbone(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool):
        x = Embeddings(self.config, name="embeddings")(input_ids, deterministic)
        special = input_ids - self.config.vocab_size
        x = Transformer(self.config, name="transformer")(x, attention_mask.astype(bool), deterministic, special)
        return {"last_hidden_state": x}


class Model(nn.Module):
    """The backbone under "distilbert", plus the task's head on the first token."""

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
        del token_type_ids  # accepted for a uniform call signature; DistilBERT has no segment embeddings
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        out = Backbone(c, name=PREFIX)(input_ids, attention_mask, deterministic)
        if self.task == "sequence-classification":
            x = jax.nn.relu(_dense(c, c.dim, "pre_classifier")(out["last_hidden_state"][:, 0], deterministic))
            x = Dropout(c.seq_classif_dropout)(x, deterministic=deterministic)
            out["logits"] = _dense(c, c.num_labels, "classifier")(x, deterministic).astype(jnp.float32)
        return out


SPEC = FamilySpec(
    name="DistilBERT",
    model_types=("distilbert",),
    config_class=Config,
    model=Model,
    architectures={
        ("distilbert", "base"): "DistilBertModel",
        ("distilbert", "sequence-classification"): "DistilBertForSequenceClassification",
    },
    lora_targets=LORA_TARGETS,
    adapter_sites={"attn": r"attention\.out_lin", "mlp": r"ffn\.lin2"},
    prefix=PREFIX,
    heads=("pre_classifier", "classifier"),
    ignored=(r"position_ids$", r"^vocab_(?:transform|layer_norm|projector)\."),  # buffers; the MLM head
    token_embedding=f"{PREFIX}.embeddings.word_embeddings",
    layer_stack=f"{PREFIX}.transformer.layer",
)
build = SPEC.build
