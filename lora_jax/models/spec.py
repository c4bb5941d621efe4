"""A model family, declared: `FamilySpec`, and the one HF <-> lora_jax conversion that every family shares.

A family file (bert.py, gpt2.py, ...) holds its architecture (a frozen `Config`, a `build(config, task)`) and a
`SPEC = FamilySpec(...)` that says how its checkpoints are named; `hub.FAMILIES` maps HF model_type values to
that file. Everything here reads only the spec, so loading, exporting, LoRA target names, PEFT layout and their
errors behave the same in every family.

Param trees mirror HF module names (`roberta.encoder.layer.0.attention.self.query.kernel`), so checkpoint keys
translate one to one: kernel <-> weight (transposed for nn.Linear, as is for GPT-2's Conv1D), embedding <->
weight, LayerNorm scale <-> weight. Keys are compared in their "canonical" form: the names of the headed HF model
(`roberta.` prefix present), which a checkpoint saved from the base class (RobertaModel) lacks.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import re
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.lora import is_lora_leaf
from lora_jax.prefix import is_prefix_leaf
from lora_jax.tree import leaf_paths

log = logging.getLogger(__name__)

LM_TASKS = ("causal-lm", "seq2seq-lm")  # tasks whose head may be a tied copy of the token embedding
_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


class CheckpointError(KeyError, ValueError):
    """A checkpoint that does not fit its config: a missing or misshapen weight, or one with no place."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The fields every family's Config has beside config.json's hyper-parameters (its fields come after these)."""

    dtype: Any = jnp.float32  # compute
    param_dtype: Any = jnp.float32
    remat: bool | str = False  # recompute each layer in the backward pass (True, "dots"): memory for time


NOT_HF = tuple(f.name for f in dataclasses.fields(ModelConfig))  # Config fields of ours, not of config.json


def _initializer_range(config: Any) -> float:
    return config.initializer_range


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """What lora_jax needs to know about a model family beyond its architecture.

    name: how errors name the family ("GPT-2").
    model_types: the HF config.json `model_type` values it handles.
    config_class: its frozen Config dataclass, a ModelConfig (dtype, param_dtype, remat) with the
        HF hyper-parameters under their config.json names (and num_labels if it has a classifier).
    model: the flax module class, built as `model(config, task)` (`build` checks the task first).
    architectures: {(model_type, task): transformers class name}; its tasks are the family's tasks.
    lora_targets: the paper's names ("q", "k", "v", "o", "mlp") -> module patterns (lora_jax.lora rules).
    fused: fused kernels and their slice names ({"c_attn": ("q", "k", "v")}).
    adapter_sites: {"attn": attention output projection, "mlp": MLP output projection}, module patterns of the
        Dense modules a bottleneck adapter follows (lora_jax.bottleneck); empty: the family takes no adapters.
    prefix: the module a headed HF model keeps the backbone under ("roberta", "transformer"), or a function of
        the config giving it; None: no prefix (T5).
    heads: patterns (regex, from the start of a param path) of head modules: a checkpoint may lack them or
        shape them for another label count (initialised fresh and reported), or hold them for another task
        (not used).
    conv1d: pattern (regex, searched in a module path) of kernels HF stores as Conv1D, (d_in, d_out): they load
        as is; every other 2-D kernel is an nn.Linear, (d_out, d_in), and transposes.
    renames: (regex, replacement) pairs applied to every checkpoint key on load (old names -> current ones).
    ignored: patterns (regex, searched in a canonical key) of checkpoint keys that are not weights of this
        model: buffers, pretraining heads. Any other key without a place is refused by name.
    tied: {HF key: the key it is a copy of} (an LM head tied to the token embedding): written on export when
        the model ties them, read on load when the model has its own head and the checkpoint lacks it.
    init_std: config -> the std of freshly initialised head kernels (transformers' initializer_range).
    read_config: (config.json dict, Config field values) -> field values; the family's own rules.
    write_config: (config, task, config.json dict) -> config.json dict; the family's own rules.
    init_inputs: how many (batch, length) int arrays `build(...).init` takes to trace the param shapes.
    causal_lm: module -> the `lora_jax.models.generate.CausalLM` a decoder-only family decodes with; None
        for families that do not decode that way.
    token_embedding / layer_stack: module paths (or functions of the config giving them) of the token embedding
        (a `lora_jax.prefix.Embed`) and of the numbered layer stack whose layers call `prefix.layer_input`: where
        prefix tuning's leaves go (lora_jax.prefix). None: the family has no prefix tuning.
    kv_prefix: whether its self-attention calls `prefix.with_kv_prefix` and its positions count on after the
        prefix (`prefix.kv_prefix_length`), as transformers' do when PEFT's prefix tuning hands them a cache:
        the family offers method=prefix_kv.
    """

    name: str
    model_types: tuple[str, ...]
    config_class: type
    model: type[nn.Module]
    architectures: Mapping[tuple[str, str], str]
    lora_targets: Mapping[str, str]
    fused: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    adapter_sites: Mapping[str, str] = dataclasses.field(default_factory=dict)
    prefix: str | Callable[[Any], str] | None = None
    heads: tuple[str, ...] = ()
    conv1d: str | None = None
    renames: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()
    tied: Mapping[str, str] = dataclasses.field(default_factory=dict)
    init_std: Callable[[Any], float] = _initializer_range
    read_config: Callable[[Mapping[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    write_config: Callable[[Any, str, dict[str, Any]], dict[str, Any]] | None = None
    init_inputs: int = 1
    causal_lm: Callable[[nn.Module], Any] | None = None
    token_embedding: str | Callable[[Any], str] | None = None
    layer_stack: str | Callable[[Any], str] | None = None
    kv_prefix: bool = False

    def embedding_path(self, config: Any) -> str | None:
        """Module path of the token embedding under `config` (None: the family names none)."""
        return self.token_embedding(config) if callable(self.token_embedding) else self.token_embedding

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(task for _, task in self.architectures))

    def check_task(self, task: str) -> None:
        check_task(task, self.tasks, self.name)

    def build(self, config: Any, task: str) -> nn.Module:
        self.check_task(task)
        return self.model(config, task)

    def prefix_of(self, config: Any) -> str | None:
        return self.prefix(config) if callable(self.prefix) else self.prefix

    def is_head(self, path: str) -> bool:
        return any(re.match(rf"(?:{h})(?:\.|$)", path) for h in self.heads)

    def hf_transposed(self, path: str) -> bool:
        """Whether the kernel at `path` (param or module path) is stored transposed in HF (nn.Linear) or not."""
        module = path.removesuffix(".kernel")
        return not (self.conv1d and re.search(self.conv1d, module))


# ------------------------------------------------------------------------------------------------------------
# Registry lookups
# ------------------------------------------------------------------------------------------------------------


def family_of(config: Any) -> FamilySpec:
    """The spec of the family file that defines this Config class."""
    return importlib.import_module(type(config).__module__).SPEC


def check_task(task: str, tasks: tuple[str, ...], family: str) -> None:
    if task not in tasks:
        raise ValueError(f"{family} has no task {task!r}; it supports tasks {list(tasks)}.")


# ------------------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------------------


def hf_fields(config_class: type, skip: tuple[str, ...] = ()) -> list[str]:
    """The Config fields that config.json shares (everything but our dtype/LoRA/remat switches and `skip`)."""
    return [f.name for f in dataclasses.fields(config_class) if f.name not in NOT_HF + skip]


def num_labels_from_hf(hf: Mapping[str, Any], num_labels: int | None) -> int:
    """The caller's num_labels, else config.json's, else its id2label's length, else 2 (transformers' default)."""
    if num_labels is None:
        num_labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
    return int(num_labels)


def label_maps(num_labels: int) -> dict[str, dict]:
    """The id2label/label2id pair transformers writes for a classifier with default label names."""
    return {
        "id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(num_labels)},
    }


def config_from_hf(
    hf: Mapping[str, Any], task: str, num_labels: int | None = None, family: FamilySpec | None = None
) -> Any:
    """A family Config from a config.json dict; the family is `hf["model_type"]`'s unless `family` is given.

    Fields config.json leaves out keep the Config's defaults; a null keeps the default where the field cannot
    be None; a list of token ids (several eos) keeps its first.
    """
    if family is None:
        from lora_jax.models.hub import family as lookup

        family = lookup(hf.get("model_type", "<missing>"))
    model_type = hf.get("model_type", family.model_types[0])
    if model_type not in family.model_types:
        raise ValueError(
            f"model_type {model_type!r} is not {family.name}: it handles model_type {list(family.model_types)}; "
            "load the checkpoint with the family that matches."
        )
    family.check_task(task)
    fields = {f.name: f for f in dataclasses.fields(family.config_class)}
    values = {}
    for name in hf_fields(family.config_class, skip=("num_labels", "model_type")):
        value = hf.get(name)
        if name not in hf or (value is None and "None" not in str(fields[name].type)):
            continue
        values[name] = value[0] if isinstance(value, list) and name.endswith("_token_id") else value
    if "model_type" in fields:
        values["model_type"] = model_type
    if "num_labels" in fields:
        values["num_labels"] = num_labels_from_hf(hf, num_labels)
    if family.read_config is not None:
        values = family.read_config(hf, values)
    return family.config_class(**values)


def config_to_hf(config: Any, task: str) -> dict[str, Any]:
    """A config.json dict that transformers loads as the family's class for `task`."""
    family = family_of(config)
    family.check_task(task)
    hf = {name: getattr(config, name) for name in hf_fields(type(config), skip=("num_labels",))}
    model_type = getattr(config, "model_type", family.model_types[0])
    hf["model_type"] = model_type
    hf["architectures"] = [family.architectures[model_type, task]]
    if hasattr(config, "num_labels"):
        hf.update(label_maps(config.num_labels))
    hf["torch_dtype"] = str(jnp.dtype(config.param_dtype))
    return family.write_config(config, task, hf) if family.write_config is not None else hf


# ------------------------------------------------------------------------------------------------------------
# State dicts
# ------------------------------------------------------------------------------------------------------------


def hf_key(path: str) -> str:
    """Flax param path -> HF state-dict key: kernel, embedding and LayerNorm scale are all `weight`."""
    module, leaf = path.rsplit(".", 1)
    return f"{module}.{_TO_HF[leaf]}"


def swap_layout(path: str, array: np.ndarray, transposed: bool = True) -> np.ndarray:
    """Flax <-> torch layout (its own inverse): nn.Linear is (out, in), Conv1d (out, in / groups, width);
    `transposed=False` (GPT-2's Conv1D, already (in, out)) leaves a 2-D kernel as is."""
    if path.endswith(".kernel") and (transposed or array.ndim != 2):
        return array.T if array.ndim == 2 else array.transpose(2, 1, 0)
    return array


def abstract_params(module: nn.Module, *inputs: jax.Array) -> dict[str, jax.ShapeDtypeStruct]:
    """{dotted param path: shape and dtype} of `module` initialised on `inputs`, without allocating it."""
    tree = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
    return dict(leaf_paths(tree))


@functools.lru_cache(maxsize=16)
def param_shapes(config: Any, task: str) -> dict[str, jax.ShapeDtypeStruct]:
    """{dotted param path: shape/dtype} of a freshly built model, without allocating it (traced once per config)."""
    family = family_of(config)
    ids = jnp.zeros((1, 2), jnp.int32)
    return abstract_params(family.build(config, task), *[ids] * family.init_inputs)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b.c": leaf} -> {"a": {"b": {"c": leaf}}}."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def fresh(path: str, shape: tuple[int, ...], std: float, dtype: Any, seed: int) -> jax.Array:
    """transformers' _init_weights for what a checkpoint lacks: N(0, std) weights, zero biases, unit scales.

    The key folds in the path, so a head's init does not depend on which other params are new.
    """
    dtype = jnp.dtype(dtype)
    leaf = path.rsplit(".", 1)[-1]
    if leaf == "bias":
        return jnp.zeros(shape, dtype)
    if leaf == "scale":
        return jnp.ones(shape, dtype)
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()))
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def check_merged(params: Mapping[str, Any]) -> None:
    """Exports hold plain weights only: LoRA factors must be merged (or saved as an adapter) first."""
    for path, _ in leaf_paths(params):
        if is_prefix_leaf(path):
            raise ValueError(f"{path} is a prefix-tuning leaf, which no HF checkpoint holds; save it as an adapter.")
        if is_lora_leaf(path):
            raise ValueError(f"{path} is a LoRA leaf; `lora_jax.lora.merge` the params before exporting.")


def canonical_state(family: FamilySpec, state: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """Checkpoint keys renamed to current names and given the backbone prefix a base-class checkpoint lacks."""
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in family.renames:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    prefix = family.prefix_of(config)
    if not prefix or any(k.startswith(prefix + ".") for k in renamed):
        return renamed
    return {(k if family.is_head(k) else f"{prefix}.{k}"): v for k, v in renamed.items()}


def params_from_hf(
    state: Mapping[str, Any], config: Any, task: str, seed: int = 0, allow_unexpected: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """Nested params from an HF state dict (torch layout), and the leaf paths initialised fresh.

    A head the checkpoint lacks, or shapes otherwise (another label count), starts fresh (`seed`) as
    transformers inits it, or as a copy of the weight it is tied to. A missing or misshapen backbone weight and a
    checkpoint key with no place in the model raise `CheckpointError` naming the key; with `allow_unexpected`,
    keys with no place are logged and left out instead.
    """
    family = family_of(config)
    family.check_task(task)
    state = canonical_state(family, state, config)
    dtype = jnp.dtype(config.param_dtype)
    flat, new, used = {}, [], set()
    for path, leaf in param_shapes(config, task).items():
        key, shape = hf_key(path), tuple(leaf.shape)
        source = key if key in state else family.tied.get(key)
        weight = None
        if source in state:
            used.add(source)
            weight = swap_layout(path, np.asarray(state[source]), family.hf_transposed(path))
        if weight is not None and weight.shape == shape:
            flat[path] = jnp.asarray(weight, dtype)
            if source != key:
                new.append(path)
        elif family.is_head(path):
            flat[path] = fresh(path, shape, family.init_std(config), dtype, seed)
            new.append(path)
        elif weight is None:
            raise CheckpointError(
                f"checkpoint has no {key!r} (for {path}); is it a {family.name} checkpoint matching config.json?"
            )
        else:
            raise CheckpointError(
                f"checkpoint weight {key!r} has shape {weight.shape}, but config.json gives {path} {shape}; "
                "fix config.json or load the checkpoint it belongs to."
            )
    _check_tied(family, state, used, task)
    unexpected = sorted(
        k for k in state if k not in used and not family.is_head(k) and k not in family.tied
        and not any(re.search(p, k) for p in family.ignored)
    )  # fmt: skip
    if unexpected and not allow_unexpected:
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"checkpoint weights {unexpected[:5]}{more} have no place in lora_jax's {family.name} for this "
            "config; load the family/config they belong to, or pass allow_unexpected=True to leave them out."
        )
    if unexpected:
        log.warning("not used (allow_unexpected): %s", ", ".join(unexpected))
    return unflatten(flat), new


def _check_tied(family: FamilySpec, state: Mapping[str, Any], used: set[str], task: str) -> None:
    """A tied model ignores the checkpoint's copy of a tied weight: refuse one that is not a copy."""
    for key, source in family.tied.items():
        if task in LM_TASKS and key in state and key not in used and source in state:
            if not np.array_equal(np.asarray(state[key]), np.asarray(state[source])):
                raise CheckpointError(
                    f"checkpoint's {key} differs from {source} but the config ties them; "
                    "load with tie_word_embeddings=False."
                )


def params_to_hf(params: Mapping[str, Any], config: Any, task: str) -> dict[str, np.ndarray]:
    """An HF state dict (torch layout) that transformers' class for `task` loads; a base model's keys carry no
    backbone prefix (as BertModel.save_pretrained writes them), and a tied head is written as a copy."""
    family = family_of(config)
    family.check_task(task)
    check_merged(params)
    state = {}
    for path, value in leaf_paths(params):
        value = np.asarray(jax.device_get(value))
        state[hf_key(path)] = np.ascontiguousarray(swap_layout(path, value, family.hf_transposed(path)))
    for key, source in family.tied.items():
        if task in LM_TASKS and key not in state and source in state:
            state[key] = state[source]
    prefix = family.prefix_of(config)
    if task == "base" and prefix:
        state = {k.removeprefix(prefix + "."): v for k, v in state.items()}
    return state
