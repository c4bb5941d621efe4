"""T5 and mT5 encoder-decoders (Raffel et al. 2020; Xue et al. 2021) in Flax, loading Hugging Face checkpoints.

Matches transformers' T5Model / T5ForConditionalGeneration / MT5ForConditionalGeneration: one `shared` token
embedding, pre-norm blocks with RMS LayerNorm (scale only, no bias), a bucketed relative position bias computed
by the first block's self-attention and reused by the others (bidirectional in the encoder, causal in the
decoder), no 1/sqrt(d) attention scaling (T5 folds it into the init), a relu FFN (v1.0, `wi`/`wo`) or a gated-gelu
one (v1.1 and mT5, `wi_0`/`wi_1`/`wo`). With `tie_word_embeddings` (T5 v1.0) the LM head is `shared` and the
decoder output is scaled by d_model**-0.5 first; v1.1 and mT5 have their own unscaled `lm_head`.

Task "seq2seq-lm" (an addition to the contract's task list): the module is called as
    module.apply({"params": p}, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None,
                 deterministic=True) -> {"logits", "last_hidden_state" (decoder), "encoder_last_hidden_state"}
and `method="encode"` / `method="decode"` run the two halves alone; `decode` takes a KV cache (`init_cache`)
so generation (lora_jax.models.seq2seq_generate) runs the encoder once and the decoder a token at a time.

Param paths are HF's (`decoder.block.0.layer.1.EncDecAttention.q.kernel`), so LoRA targets name modules as PEFT
does: its default T5 targets ["q", "v"] are every q and v projection, self- and cross-attention, both stacks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.layers import Dense, Dropout
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
    masked_softmax,
    maybe_remat,
    swap_layout,
    unflatten,
    write_cache,
)
from lora_jax.models.relative_positions import relative_position_bucket
from lora_jax.tree import leaf_paths

MODEL_TYPES = ("t5", "mt5")
_ATTENTIONS = r"(?:SelfAttention|EncDecAttention)"
LORA_TARGETS = {
    "q": rf"{_ATTENTIONS}\.q",
    "k": rf"{_ATTENTIONS}\.k",
    "v": rf"{_ATTENTIONS}\.v",
    "o": rf"{_ATTENTIONS}\.o",
    "mlp": r"DenseReluDense\.(?:wi|wi_0|wi_1|wo)",
}
FUSED: dict[str, tuple[str, ...]] = {}
TASKS = ("base", "seq2seq-lm")
ARCHITECTURES = {
    ("t5", "base"): "T5Model",
    ("t5", "seq2seq-lm"): "T5ForConditionalGeneration",
    ("mt5", "base"): "MT5Model",
    ("mt5", "seq2seq-lm"): "MT5ForConditionalGeneration",
}
Cache = list  # per decoder block: {"k", "v"} (batch, max_length, heads, d_kv), plus "cross_k"/"cross_v" once filled
# Keys transformers keeps that are not weights of their own: the stacks' aliases of `shared`, and a relative
# bias some old checkpoints carry for cross-attention, which T5 never uses.
_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "EncDecAttention.relative_attention_bias")


@dataclasses.dataclass(frozen=True)
class Config:
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
    dtype: Any = "float32"  # compute
    param_dtype: Any = "float32"
    remat: bool | str = False

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"t5.py handles model_type {MODEL_TYPES}, got {self.model_type!r}.")
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


_HF_FIELDS = hf_fields(Config)


def _check_task(task: str) -> None:
    check_task(task, TASKS, "T5")


def config_from_hf(hf: Mapping[str, Any], task: str, num_labels: int | None = None) -> Config:
    """A Config from a config.json dict. `num_labels` is accepted for the contract and unused.

    Tying follows transformers 5, which rewrites every saved config's `tie_word_embeddings` to True: for T5 the
    `scale_decoder_outputs` it saves beside it (else the original flag) says whether the head is the embedding;
    mT5 never scales, and every released mT5/mT0 has its own `lm_head`, so it is always untied.
    """
    _check_task(task)
    model_type = hf.get("model_type", "t5")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not T5/mT5; pick the model family that matches.")
    values = {k: hf[k] for k in _HF_FIELDS if k in hf and hf[k] is not None}
    if model_type == "mt5":
        values.setdefault("feed_forward_proj", "gated-gelu")
        values["tie_word_embeddings"] = False
    else:
        values["tie_word_embeddings"] = bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True)))
    if isinstance(values.get("eos_token_id"), list):  # several allowed in HF; decoding here stops on the first
        values["eos_token_id"] = values["eos_token_id"][0]
    values.setdefault("decoder_start_token_id", values.get("pad_token_id", 0))
    return Config(**values)


def config_to_hf(config: Config, task: str) -> dict[str, Any]:
    """A config.json dict transformers loads as the matching (M)T5 class."""
    _check_task(task)
    hf = {name: getattr(config, name) for name in _HF_FIELDS}
    hf["num_decoder_layers"] = config.decoder_layers
    hf["architectures"] = [ARCHITECTURES[config.model_type, task]]
    hf["is_encoder_decoder"] = True
    if config.model_type == "t5":
        hf["scale_decoder_outputs"] = config.tie_word_embeddings
    hf["torch_dtype"] = str(jnp.dtype(config.param_dtype))
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
    def __call__(self, x, source, mask, position_bias, deterministic: bool, kv: dict | None, cache_index):
        c = self.config
        inner = c.num_heads * c.d_kv
        split = lambda t: t.reshape(*t.shape[:-1], c.num_heads, c.d_kv)  # noqa: E731
        q = split(_dense(c, inner, (c.d_model * c.d_kv) ** -0.5, "q")(x, deterministic))
        key_proj, value_proj = (_dense(c, inner, c.d_model**-0.5, n) for n in ("k", "v"))
        if self.cross and kv is not None and "cross_k" in kv:  # the encoder's keys/values, computed on step 0
            k, v = kv["cross_k"], kv["cross_v"]
        else:
            source = x if source is None else source
            k, v = split(key_proj(source, deterministic)), split(value_proj(source, deterministic))
            if kv is not None and self.cross:
                kv = {**kv, "cross_k": k, "cross_v": v}
            elif kv is not None:  # write this call's keys/values at slots cache_index.., attend over the cache
                kv = write_cache(kv, k, v, cache_index)
                k, v = kv["k"], kv["v"]

        # No 1/sqrt(d_kv): T5 folds it into q's init. Scores and softmax in float32 whatever the compute dtype.
        scores = attention_scores(q, k)
        if self.has_relative_bias:
            query_pos = cache_index + jnp.arange(x.shape[1])
            relative = jnp.arange(k.shape[1])[None, :] - query_pos[:, None]
            buckets = relative_position_bucket(
                relative, not self.causal, c.relative_attention_num_buckets, c.relative_attention_max_distance
            )
            bias = nn.Embed(
                c.relative_attention_num_buckets,
                c.num_heads,
                param_dtype=jnp.dtype(c.param_dtype),
                embedding_init=nn.initializers.normal(c.initializer_factor * c.d_model**-0.5),
                name="relative_attention_bias",
            )(buckets)
            position_bias = jnp.transpose(bias, (2, 0, 1))[None].astype(jnp.float32)  # (1, heads, q, k)
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
    def __call__(self, x, source, mask, position_bias, deterministic, kv, cache_index):
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
    def __call__(self, x, deterministic: bool):
        c = self.config
        drop = Dropout(c.dropout_rate)
        h = _norm(c)(x)
        ffn = DenseReluDense(c, name="DenseReluDense")
        return x + drop(ffn(h, deterministic), deterministic=deterministic)


class DenseReluDense(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x, deterministic: bool):
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
    def __call__(self, x, mask, position_bias, encoder_hidden, encoder_mask, deterministic, kv, cache_index):
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
    def __call__(self, x, mask, position_bias, encoder_hidden, encoder_mask, deterministic, kv, cache_index):
        return SubLayers(self.config, self.decoder, self.first, name="layer")(
            x, mask, position_bias, encoder_hidden, encoder_mask, deterministic, kv, cache_index
        )


class Blocks(nn.Module):
    """Children named "0", "1", ... so paths read `encoder.block.<i>`, as in transformers."""

    config: Config
    decoder: bool

    @nn.compact
    def __call__(self, x, mask, encoder_hidden, encoder_mask, deterministic, cache, cache_index):
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
    def __call__(self, x, mask, encoder_hidden, encoder_mask, deterministic, cache=None, cache_index=0):
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
        self.shared = nn.Embed(
            c.vocab_size,
            c.d_model,
            dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype),
            embedding_init=nn.initializers.normal(c.initializer_factor),
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

    def encode(self, input_ids, attention_mask=None, deterministic: bool = True) -> dict[str, jax.Array]:
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


def build(config: Config, task: str = "seq2seq-lm") -> T5:
    _check_task(task)
    return T5(config, task)


def init_cache(config: Config, batch_size: int, max_length: int) -> Cache:
    """An empty self-attention KV cache of fixed size, in the compute dtype, for `T5.decode`."""
    return empty_cache(config.decoder_layers, batch_size, max_length, config.num_heads, config.d_kv, config.dtype)


# ------------------------------------------------------------------------------------------------------------
# Checkpoint conversion: nn.Linear weights are (out, in), so kernels transpose; embeddings and norms do not.
# ------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def param_shapes(config: Config, task: str) -> dict[str, jax.ShapeDtypeStruct]:
    """{dotted param path: shape/dtype} of a freshly built model, without allocating it (traced once per config)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return abstract_params(build(config, task), ids, ids, ids)


def params_from_hf(
    state: Mapping[str, np.ndarray], config: Config, task: str, seed: int = 0
) -> tuple[dict[str, Any], list[str]]:
    """Flax params from an HF state dict (T5Model or a ...ForConditionalGeneration checkpoint).

    `seed` is accepted for the contract; no T5 weight is ever drawn fresh.
    An untied model whose checkpoint lacks `lm_head.weight` (a T5Model checkpoint) starts its head as a copy of
    `shared`, as transformers ties it then, and names it in the second value.
    """
    _check_task(task)
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    flat: dict[str, Any] = {}
    new, used = [], set()
    for path, spec in param_shapes(config, task).items():
        key = hf_key(path)
        if key == "lm_head.weight" and key not in state:
            key = "shared.weight"
            new.append("lm_head")
        if key not in state:
            raise ValueError(f"Checkpoint has no {key!r}; is it a {config.model_type} checkpoint matching this config?")
        value = np.asarray(state[key])
        used.add(key)
        value = value.T if path.endswith(".kernel") else value
        if value.shape != spec.shape:
            raise ValueError(f"{key}: checkpoint shape {value.shape} != model shape {spec.shape}; fix the config.")
        flat[path] = jnp.asarray(value, jnp.dtype(config.param_dtype))
    if config.tie_word_embeddings and "lm_head.weight" in state and task == "seq2seq-lm":
        if not np.array_equal(np.asarray(state["lm_head.weight"]), np.asarray(state["shared.weight"])):
            raise ValueError(
                "Checkpoint's lm_head.weight differs from shared.weight but the config ties them; "
                "load with tie_word_embeddings=False."
            )
    used.add("lm_head.weight")  # a base model ignores an LM checkpoint's head
    unexpected = sorted(k for k in set(state) - used if not any(s in k for s in _IGNORED))
    if unexpected:
        raise ValueError(f"Checkpoint weights {unexpected[:5]} have no place in lora_jax's T5; wrong family?")
    return unflatten(flat), new


def params_to_hf(params: Mapping[str, Any], config: Config, task: str) -> dict[str, np.ndarray]:
    """An HF state dict (torch layout); a tied model's `lm_head.weight` is a copy of `shared`, as transformers saves."""
    _check_task(task)
    check_merged(params)
    state = {}
    for path, value in leaf_paths(params):
        value = np.asarray(jax.device_get(value))
        state[hf_key(path)] = np.ascontiguousarray(swap_layout(path, value))
    if task == "seq2seq-lm" and config.tie_word_embeddings:
        state["lm_head.weight"] = state["shared.weight"]
    return state
