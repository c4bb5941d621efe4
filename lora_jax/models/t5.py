"""T5 and mT5 encoder-decoders (Raffel et al. 2020; Xue et al. 2021) in Flax, loading Hugging Face checkpoints.

Matches transformers' T5Model / T5ForConditionalGeneration / MT5ForConditionalGeneration: one `shared` token
embedding, pre-norm blocks with RMS LayerNorm (scale only, no bias), a bucketed relative position bias computed
by the first block's self-attention and reused by the others (bidirectional in the encoder, causal in the
decoder), no 1/sqrt(d) attention scaling (T5 folds it into the init), a relu FFN (v1.0, `wi`/`wo`) or a gated-gelu
one (v1.1 and mT5, `wi_0`/`wi_1`/`wo`). With `tie_word_embeddings` (T5 v1.0) the LM head is `shared` and the
decoder output is scaled by d_model**-0.5 first; v1.1 and mT5 have their own unscaled `lm_head`.

Task "seq2seq-lm": `module.apply({"params": p}, input_ids, attention_mask, decoder_input_ids, ...)` returns
{"logits", "last_hidden_state" (decoder), "encoder_last_hidden_state"}; `method="encode"` / `"decode"` run the
halves alone, `decode` with a KV cache (`init_cache`), so generation (lora_jax.models.seq2seq_generate) runs the
encoder once and the decoder a token at a time.

Param paths are HF's (`decoder.block.0.layer.1.EncDecAttention.q.kernel`), so LoRA targets name modules as PEFT
does: its default T5 targets ["q", "v"] are every q and v projection, self- and cross-attention, both stacks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.layers import Dense, Dropout
from lora_jax.models.common import (
    ACTIVATIONS,
    attend,
    attention_scores,
    causal_cache_mask,
    dense,
    empty_cache,
    heads_first,
    masked_softmax,
    maybe_remat,
    write_cache,
)
from lora_jax.models.relative_positions import relative_position_bucket
from lora_jax.models.spec import FamilySpec, ModelConfig

MODEL_TYPES = ("t5", "mt5")
_ATTENTIONS = r"(?:SelfAttention|EncDecAttention)"
LORA_TARGETS = {
    "q": rf"{_ATTENTIONS}\.q",
    "k": rf"{_ATTENTIONS}\.k",
    "v": rf"{_ATTENTIONS}\.v",
    "o": rf"{_ATTENTIONS}\.o",
    "mlp": r"DenseReluDense\.(?:wi|wi_0|wi_1|wo)",
}
_BIAS = "relative_attention_bias"  # the first block's table of (bucket, head) biases
Cache = list  # per decoder block: {"k", "v"} (batch, max_length, heads, d_kv), plus "cross_k"/"cross_v" once filled


@dataclasses.dataclass(frozen=True)
class Config(ModelConfig):
    model_type: str = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"  # "relu" (v1.0) or "gated-gelu" (v1.1, mT5)
    tie_word_embeddings: bool = True  # LM head = shared embedding, decoder output scaled by d_model**-0.5
    pad_token_id: int = 0
    eos_token_id: int | None = 1
    decoder_start_token_id: int = 0

    def __post_init__(self) -> None:
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.activation not in ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj {self.feed_forward_proj!r} is not supported; use 'relu', 'gated-gelu' or "
                f"[gated-]one of {sorted(ACTIVATIONS)}."
            )

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # transformers maps "gated-gelu" to the tanh approximation, which is what T5 v1.1 was trained with.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers


def _read_config(hf: Mapping[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 saves `tie_word_embeddings` True always: for T5 `scale_decoder_outputs` (else the flag) says
    whether the head is the embedding; mT5 never scales and every released mT5/mT0 has its own `lm_head`."""
    if values["model_type"] == "mt5":
        values.setdefault("feed_forward_proj", "gated-gelu")
        values["tie_word_embeddings"] = False
    else:
        values["tie_word_embeddings"] = bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True)))
    values.setdefault("decoder_start_token_id", values.get("pad_token_id", 0))
    return values


def _write_config(config: Config, task: str, hf: dict[str, Any]) -> dict[str, Any]:
    hf["num_decoder_layers"] = config.decoder_layers
    hf["is_encoder_decoder"] = True
    if config.model_type == "t5":
        hf["scale_decoder_outputs"] = config.tie_word_embeddings
    return hf


def shift_right(labels: jax.Array, decoder_start_token_id: int, pad_token_id: int) -> jax.Array:
    """Teacher-forcing decoder inputs from labels: start token first, -100 (ignored label) read as pad."""
    shifted = jnp.concatenate([jnp.full_like(labels[:, :1], decoder_start_token_id), labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


# ------------------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------------------


def _dense(c: Config, features: int, std: float, name: str) -> Dense:
    return dense(c, features, name, c.initializer_factor * std, use_bias=False)


def _norm(c: Config, name: str = "layer_norm") -> nn.RMSNorm:
    # Statistics in float32 whatever the compute dtype, as T5LayerNorm does.
    return nn.RMSNorm(
        epsilon=c.layer_norm_epsilon, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), name=name
    )


class Attention(nn.Module):
    """T5Attention: q, k, v, o without bias; self-attention or cross-attention (`cross`)."""

    config: Config
    cross: bool = False
    causal: bool = False
    has_relative_bias: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        source: jax.Array | None,
        mask: jax.Array,
        position_bias: jax.Array | None,
        deterministic: bool,
        kv: dict | None,
        cache_index: jax.Array | int,
    ):
        c = self.config
        inner = c.num_heads * c.d_kv
        split = lambda t: t.reshape(*t.shape[:-1], c.num_heads, c.d_kv)  # noqa: E731
        q = split(_dense(c, inner, (c.d_model * c.d_kv) ** -0.5, "q")(x, deterministic))
        key_proj, value_proj = (_dense(c, inner, c.d_model**-0.5, n) for n in ("k", "v"))
        if self.cross and kv is not None and "cross_k" in kv:  # the encoder's keys/values, computed on step 0
            k, v = kv["cross_k"], kv["cross_v"]
        else:
            source = x if source is None else source
            k, v = (heads_first(split(p(source, deterministic))) for p in (key_proj, value_proj))
            if kv is not None and self.cross:
                kv = {**kv, "cross_k": k, "cross_v": v}
            elif kv is not None:  # write this call's keys/values at slots cache_index.., attend over the cache
                kv = write_cache(kv, k, v, cache_index)
                k, v = kv["k"], kv["v"]

        # No 1/sqrt(d_kv): T5 folds it into q's init. Scores and softmax in float32 whatever the compute dtype.
        scores = attention_scores(q, k)
        if self.has_relative_bias:
            relative = jnp.arange(k.shape[2])[None, :] - (cache_index + jnp.arange(x.shape[1]))[:, None]
            n = c.relative_attention_num_buckets
            buckets = relative_position_bucket(relative, not self.causal, n, c.relative_attention_max_distance)
            init = nn.initializers.normal(c.initializer_factor * c.d_model**-0.5)
            table = nn.Embed(n, c.num_heads, param_dtype=jnp.dtype(c.param_dtype), embedding_init=init, name=_BIAS)
            position_bias = jnp.transpose(table(buckets), (2, 0, 1))[None].astype(jnp.float32)  # (1, heads, q, k)
        if position_bias is not None:
            scores = scores + position_bias
        probs = masked_softmax(scores, mask, jnp.dtype(c.dtype))
        probs = Dropout(c.dropout_rate)(probs, deterministic=deterministic)
        out = attend(probs, v.astype(probs.dtype)).reshape(*x.shape[:-1], inner)
        return _dense(c, c.d_model, inner**-0.5, "o")(out, deterministic), position_bias, kv


class AttentionLayer(nn.Module):
    """T5LayerSelfAttention / T5LayerCrossAttention: x + dropout(attention(norm(x)))."""

    config: Config
    attention_name: str  # "SelfAttention" or "EncDecAttention"
    causal: bool = False
    has_relative_bias: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        source: jax.Array | None,
        mask: jax.Array,
        position_bias: jax.Array | None,
        deterministic: bool,
        kv: dict | None,
        cache_index: jax.Array | int,
    ):
        c = self.config
        cross = self.attention_name == "EncDecAttention"
        h, position_bias, kv = Attention(c, cross, self.causal, self.has_relative_bias, name=self.attention_name)(
            _norm(c)(x), source, mask, position_bias, deterministic, kv, cache_index
        )
        return x + Dropout(c.dropout_rate)(h, deterministic=deterministic), position_bias, kv


class FeedForward(nn.Module):
    """T5LayerFF: x + dropout(DenseReluDense(norm(x))), the FFN relu (`wi`) or gated (`wi_0` * act, `wi_1`)."""

    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool):
        h = DenseReluDense(self.config, name="DenseReluDense")(_norm(self.config)(x), deterministic)
        return x + Dropout(self.config.dropout_rate)(h, deterministic=deterministic)


class DenseReluDense(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool):
        c = self.config
        act = ACTIVATIONS[c.activation]
        if c.gated:
            h = act(_dense(c, c.d_ff, c.d_model**-0.5, "wi_0")(x, deterministic))
            h = h * _dense(c, c.d_ff, c.d_model**-0.5, "wi_1")(x, deterministic)
        else:
            h = act(_dense(c, c.d_ff, c.d_model**-0.5, "wi")(x, deterministic))
        h = Dropout(c.dropout_rate)(h, deterministic=deterministic)
        return _dense(c, c.d_model, c.d_ff**-0.5, "wo")(h, deterministic)


class SubLayers(nn.Module):
    """T5Block's `layer` list: 0 self-attention, (1 cross-attention,) last the feed-forward."""

    config: Config
    decoder: bool
    first: bool  # the first block owns the relative position bias

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        position_bias: jax.Array | None,
        encoder_hidden: jax.Array | None,
        encoder_mask: jax.Array | None,
        deterministic: bool,
        kv: dict | None,
        cache_index: jax.Array | int,
    ):
        c = self.config
        self_attention = AttentionLayer(c, "SelfAttention", self.decoder, self.first, name="0")
        x, position_bias, kv = self_attention(x, None, mask, position_bias, deterministic, kv, cache_index)
        if self.decoder:
            cross = AttentionLayer(c, "EncDecAttention", name="1")
            x, _, kv = cross(x, encoder_hidden, encoder_mask, None, deterministic, kv, cache_index)
        x = FeedForward(c, name=str(2 if self.decoder else 1))(x, deterministic)
        return x, position_bias, kv


class Block(nn.Module):
    config: Config
    decoder: bool
    first: bool

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        position_bias: jax.Array | None,
        encoder_hidden: jax.Array | None,
        encoder_mask: jax.Array | None,
        deterministic: bool,
        kv: dict | None,
        cache_index: jax.Array | int,
    ):
        return SubLayers(self.config, self.decoder, self.first, name="layer")(
            x, mask, position_bias, encoder_hidden, encoder_mask, deterministic, kv, cache_index
        )


class Blocks(nn.Module):
    """Children named "0", "1", ... so paths read `encoder.block.<i>`, as in transformers."""

    config: Config
    decoder: bool

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        encoder_hidden: jax.Array | None,
        encoder_mask: jax.Array | None,
        deterministic: bool,
        cache: Cache | None,
        cache_index: jax.Array | int,
    ):
        c = self.config
        block = maybe_remat(Block, c.remat, deterministic_argnum=6)
        position_bias, new_cache = None, []
        for i in range(c.decoder_layers if self.decoder else c.num_layers):
            kv = None if cache is None else cache[i]
            x, position_bias, kv = block(c, self.decoder, i == 0, name=str(i))(
                x, mask, position_bias, encoder_hidden, encoder_mask, deterministic, kv, cache_index
            )
            new_cache.append(kv)
        return x, (None if cache is None else new_cache)


class Stack(nn.Module):
    """T5Stack: dropout(embeddings) -> blocks -> final_layer_norm -> dropout."""

    config: Config
    decoder: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        encoder_hidden: jax.Array | None,
        encoder_mask: jax.Array | None,
        deterministic: bool,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
    ):
        c = self.config
        drop = Dropout(c.dropout_rate)
        x = drop(x, deterministic=deterministic)
        x, cache = Blocks(c, self.decoder, name="block")(
            x, mask, encoder_hidden, encoder_mask, deterministic, cache, cache_index
        )
        return drop(_norm(c, "final_layer_norm")(x), deterministic=deterministic), cache


class T5(nn.Module):
    """The encoder-decoder with the head of `task`; see the module docstring for the call signature."""

    config: Config
    task: str = "seq2seq-lm"

    def setup(self) -> None:
        c = self.config
        init = nn.initializers.normal(c.initializer_factor)
        self.shared = nn.Embed(
            c.vocab_size, c.d_model, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), embedding_init=init
        )
        self.encoder = Stack(c, decoder=False)
        self.decoder = Stack(c, decoder=True)
        if self.task == "seq2seq-lm" and not c.tie_word_embeddings:
            self.lm_head = _dense(c, c.vocab_size, 1.0, "lm_head")

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        decoder_input_ids: jax.Array | None = None,
        decoder_attention_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> dict[str, jax.Array]:
        if decoder_input_ids is None:
            raise ValueError("T5 needs decoder_input_ids; make them from labels with t5.shift_right.")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        encoded = self.encode(input_ids, attention_mask, deterministic)["last_hidden_state"]
        out = self.decode(decoder_input_ids, encoded, attention_mask, decoder_attention_mask, deterministic)
        return {**out, "encoder_last_hidden_state": encoded}

    def encode(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, deterministic: bool = True
    ) -> dict[str, jax.Array]:
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        mask = attention_mask.astype(bool)[:, None, None, :]
        hidden, _ = self.encoder(self.shared(input_ids), mask, None, None, deterministic)
        return {"last_hidden_state": hidden}

    def decode(
        self,
        decoder_input_ids: jax.Array,
        encoder_hidden_states: jax.Array,
        attention_mask: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> dict[str, Any]:
        """Decoder (and LM head) over encoder outputs. With `cache`, writes keys/values at slots cache_index..

        and `decoder_attention_mask` (if given) covers the whole cache, (batch, max_length). A cache without
        cross-attention keys/values gets them from `encoder_hidden_states`; later calls reuse them.
        """
        mask = causal_cache_mask(decoder_input_ids.shape, decoder_attention_mask, cache, cache_index)
        encoder_mask = attention_mask.astype(bool)[:, None, None, :]
        hidden, cache = self.decoder(
            self.shared(decoder_input_ids), mask, encoder_hidden_states, encoder_mask, deterministic, cache, cache_index
        )
        out = {"last_hidden_state": hidden}
        if cache is not None:
            out["cache"] = cache
        if self.task == "seq2seq-lm":
            out["logits"] = self.logits(hidden, deterministic)
        return out

    def logits(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
        if self.config.tie_word_embeddings:
            return self.shared.attend(hidden * self.config.d_model**-0.5)
        return self.lm_head(hidden, deterministic)


def init_cache(config: Config, batch_size: int, max_length: int) -> Cache:
    """An empty self-attention KV cache of fixed size, in the compute dtype, for `T5.decode`."""
    return empty_cache(config.decoder_layers, batch_size, max_length, config.num_heads, config.d_kv, config.dtype)


SPEC = FamilySpec(
    name="T5",
    model_types=MODEL_TYPES,
    config_class=Config,
    model=T5,
    architectures={
        (model_type, task): f"{name}{head}"
        for model_type, name in (("t5", "T5"), ("mt5", "MT5"))
        for task, head in (("base", "Model"), ("seq2seq-lm", "ForConditionalGeneration"))
    },
    lora_targets=LORA_TARGETS,
    adapter_sites={"attn": r"(?:SelfAttention|EncDecAttention)\.o", "mlp": r"DenseReluDense\.wo"},
    heads=("lm_head",),
    renames=((r"^transformer\.", ""),),
    # The stacks' aliases of `shared`, and a relative bias some old checkpoints carry for cross-attention, which
    # T5 never uses: kept by transformers, not weights of their own.
    ignored=(r"^(?:encoder|decoder)\.embed_tokens\.weight$", r"EncDecAttention\.relative_attention_bias"),
    # Untied (v1.1, mT5) from a T5Model checkpoint: the head starts as `shared`, as transformers ties it then.
    tied={"lm_head.weight": "shared.weight"},
    init_std=lambda config: config.initializer_factor,
    read_config=_read_config,
    write_config=_write_config,
    init_inputs=3,
)
build = SPEC.build
