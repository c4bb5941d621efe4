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
import zlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.layers import Dense
from lora_jax.lora import leaf_paths

MODEL_TYPES = ("bert", "roberta")
LORA_TARGETS = {
    "q": r"attention\.self\.query",
    "k": r"attention\.self\.key",
    "v": r"attention\.self\.value",
    "o": r"attention\.output\.dense",
    "mlp": r"intermediate\.dense|layer\.\d+\.output\.dense",
}
FUSED: dict[str, tuple[str, ...]] = {}
TASKS = ("base", "sequence-classification")
HEADS = ("classifier", "pooler")  # modules a checkpoint may lack: initialised fresh, as transformers does

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class Config:
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
    dtype: Any = jnp.float32  # compute
    param_dtype: Any = jnp.float32
    lora_dropout: float = 0.0
    remat: bool = False  # recompute each layer's activations in the backward pass: memory for ~30% time

    @property
    def prefix(self) -> str:
        return self.model_type

    @property
    def has_pooler(self) -> bool:
        return self.model_type == "bert"


def config_from_hf(hf: Mapping[str, Any], task: str, num_labels: int | None = None) -> Config:
    if hf.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"bert.py handles model_type {MODEL_TYPES}, got {hf.get('model_type')!r}.")
    _check_task(task)
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"position_embedding_type={hf['position_embedding_type']!r} is not supported; only 'absolute'."
        )
    if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise ValueError(
            f"hidden_act={hf['hidden_act']!r} is not supported; use one of {sorted(ACTIVATIONS)}"
        )
    if num_labels is None:
        num_labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
    fields = {f.name for f in dataclasses.fields(Config)} - {"dtype", "param_dtype", "lora_dropout", "remat"}
    return Config(**{k: v for k, v in hf.items() if k in fields and k != "num_labels"}, num_labels=num_labels)


def config_to_hf(config: Config, task: str) -> dict[str, Any]:
    _check_task(task)
    skip = {"dtype", "param_dtype", "lora_dropout", "remat", "num_labels"}
    hf = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in skip}
    name = {"bert": "Bert", "roberta": "Roberta"}[config.model_type]
    head = "Model" if task == "base" else "ForSequenceClassification"
    hf["architectures"] = [name + head]
    if task != "base":
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    if config.model_type == "roberta":
        hf.setdefault("bos_token_id", 0)
        hf.setdefault("eos_token_id", 2)
    return hf


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"BERT/RoBERTa support tasks {TASKS}, got {task!r}.")


# ------------------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------------------


def _dense(config: Config, features: int, name: str) -> Dense:
    return Dense(
        features,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.initializers.normal(config.initializer_range),
        lora_dropout=config.lora_dropout,
        name=name,
    )


def _layer_norm(config: Config, name: str = "LayerNorm") -> nn.LayerNorm:
    return nn.LayerNorm(config.layer_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype, name=name)


def position_ids(config: Config, input_ids: jax.Array) -> jax.Array:
    if config.model_type == "roberta":
        # As transformers' create_position_ids_from_input_ids: pads keep padding_idx, tokens count on from it.
        real = (input_ids != config.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(real, axis=1) * real + config.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)


class Embeddings(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        c = self.config
        embed = lambda n, name: nn.Embed(
            n,
            c.hidden_size,
            embedding_init=nn.initializers.normal(c.initializer_range),
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            name=name,
        )
        x = embed(c.vocab_size, "word_embeddings")(input_ids)
        x = x + embed(c.max_position_embeddings, "position_embeddings")(position_ids(c, input_ids))
        x = x + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = _layer_norm(c)(x)
        return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        c = self.config
        heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim)  # (b, t, h, d)
        q = split(_dense(c, c.hidden_size, "query")(x, deterministic))
        k = split(_dense(c, c.hidden_size, "key")(x, deterministic))
        v = split(_dense(c, c.hidden_size, "value")(x, deterministic))
        # Scores and softmax in float32 whatever the compute dtype: bf16 logits lose the small differences.
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        probs = nn.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return out.reshape(*out.shape[:-2], c.hidden_size)


class AddNorm(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): transformers' BertSelfOutput and BertOutput."""

    config: Config

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        c = self.config
        x = _dense(c, c.hidden_size, "dense")(x, deterministic)
        x = nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
        return _layer_norm(c)(x + residual)


class TransformerLayer(nn.Module):
    """One encoder layer: attention.{self, output}, intermediate.dense, output.{dense, LayerNorm}."""

    config: Config

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        c = self.config
        x = Attention(c, name="attention")(x, mask, deterministic)
        h = Intermediate(c, name="intermediate")(x, deterministic)
        return AddNorm(c, name="output")(h, x, deterministic)


class Attention(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        a = SelfAttention(self.config, name="self")(x, mask, deterministic)
        return AddNorm(self.config, name="output")(a, x, deterministic)


class Intermediate(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.config
        return ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, "dense")(x, deterministic))


class Layers(nn.Module):
    """Children named "0", "1", ... so the tree reads encoder.layer.<i>, as in transformers."""

    config: Config

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        block = nn.remat(TransformerLayer, static_argnums=(3,)) if self.config.remat else TransformerLayer
        for i in range(self.config.num_hidden_layers):
            x = block(self.config, name=str(i))(x, mask, deterministic)
        return x


class Encoder(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        return Layers(self.config, name="layer")(x, mask, deterministic)


class Pooler(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x, deterministic: bool):
        return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(x[:, 0], deterministic))


class Backbone(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, deterministic: bool):
        c = self.config
        x = Embeddings(c, name="embeddings")(input_ids, token_type_ids, deterministic)
        x = Encoder(c, name="encoder")(x, attention_mask.astype(bool), deterministic)
        out = {"last_hidden_state": x}
        if c.has_pooler:
            out["pooler_output"] = Pooler(c, name="pooler")(x, deterministic)
        return out


class RobertaClassificationHead(nn.Module):
    """dropout -> dense -> tanh -> dropout -> out_proj, on the <s> token."""

    config: Config

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.config
        drop = nn.Dropout(_classifier_dropout(c))
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
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
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
                pooled = nn.Dropout(_classifier_dropout(c))(out["pooler_output"], deterministic=deterministic)
                logits = _dense(c, c.num_labels, "classifier")(pooled, deterministic)
            out["logits"] = logits.astype(jnp.float32)
        return out


def build(config: Config, task: str = "base") -> Model:
    _check_task(task)
    return Model(config, task)


# ------------------------------------------------------------------------------------------------------------
# Checkpoint conversion
# ------------------------------------------------------------------------------------------------------------

_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def _hf_key(path: str) -> str:
    module, leaf = path.rsplit(".", 1)
    return f"{module}.{_TO_HF[leaf]}"


def param_shapes(config: Config, task: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{dotted param path: (shape, dtype)} of a freshly built model, without allocating it."""
    ids = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: build(config, task).init(jax.random.key(0), ids)["params"])
    return {p: (tuple(s.shape), s.dtype) for p, s in leaf_paths(shapes)}


def _normalise_keys(state: Mapping[str, Any], config: Config) -> dict[str, Any]:
    """Give every backbone key the model prefix; checkpoints saved from BertModel/RobertaModel have none."""
    prefixed = any(k.startswith(config.prefix + ".") for k in state)
    out = {}
    for key, value in state.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[key if prefixed else f"{config.prefix}.{key}"] = value
    return out


def _fresh(path: str, shape: tuple[int, ...], dtype: Any, config: Config, seed: int) -> jax.Array:
    """transformers' _init_weights: N(0, initializer_range) weights, zero biases, unit LayerNorm scales."""
    leaf = path.rsplit(".", 1)[-1]
    if leaf == "bias":
        return jnp.zeros(shape, dtype)
    if leaf == "scale":
        return jnp.ones(shape, dtype)
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()))
    return (config.initializer_range * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def params_from_hf(
    state: Mapping[str, np.ndarray], config: Config, task: str, seed: int = 0
) -> tuple[dict[str, Any], list[str]]:
    """HF state dict (torch layout) -> nested params; heads the checkpoint lacks are initialised fresh."""
    state = _normalise_keys(state, config)
    flat, new = {}, []
    for path, (shape, _) in param_shapes(config, task).items():
        key = _hf_key(path)
        if key not in state:
            if not any(h in path.split(".") for h in HEADS):
                raise KeyError(f"checkpoint has no weight {key!r} (for {path}); is it a {config.model_type}?")
            flat[path] = _fresh(path, shape, config.param_dtype, config, seed)
            new.append(path.rsplit(".", 1)[0])
            continue
        value = np.asarray(state[key])
        if path.endswith(".kernel"):
            value = value.T
        if value.shape != shape:
            raise ValueError(f"checkpoint weight {key!r} has shape {value.shape}; the config expects {shape}")
        flat[path] = jnp.asarray(value, config.param_dtype)
    return _unflatten(flat), list(dict.fromkeys(new))


def params_to_hf(params: Mapping[str, Any], config: Config, task: str) -> dict[str, np.ndarray]:
    """Nested params -> HF state dict; a base model's keys carry no prefix, as BertModel.save_pretrained."""
    state = {}
    for path, value in leaf_paths(params):
        value = np.asarray(value)
        key = _hf_key(path)
        if task == "base":
            key = key.removeprefix(config.prefix + ".")
        state[key] = np.ascontiguousarray(value.T if path.endswith(".kernel") else value)
    return state


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree
