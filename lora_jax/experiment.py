"""A run from a config: `run(cfg)` (what experiments/run.py calls) and `run_packed(cfgs)` (a sweep as one
program). The config's schema, resolvers and conversions to the library's dataclasses are lora_jax.config's."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from omegaconf import DictConfig, OmegaConf

from lora_jax import causal_lm
from lora_jax.adapters import load_adapter
from lora_jax.bottleneck import ADAPTER_METHODS, adapter_wrap
from lora_jax.config import (
    adapter_config_for,
    decode_config,
    lora_config_for,
    model_folder,
    model_name,
    train_config,
)
from lora_jax.data import glue_metrics, load_split, predictions_from_logits, task_from_config, tokenize
from lora_jax.data.batching import subset_indices
from lora_jax.data.prefix import SpecialTokens, tokenize_with_prefix
from lora_jax.data.seq2seq import text_to_text_metrics, tokenize_text_to_text
from lora_jax.export import Export
from lora_jax.logging import WandbLogger
from lora_jax.lora import LoraConfig, lora_wrap
from lora_jax.methods import count_params
from lora_jax.models import gguf
from lora_jax.models.hub import from_pretrained, resolve
from lora_jax.models.seq2seq_generate import eval_generator
from lora_jax.models.spec import family_of
from lora_jax.prefix import PREFIX_METHODS, TOKEN_METHODS, PrefixConfig, prefix_wrap
from lora_jax.sweep import SweepRun, train_packed
from lora_jax.train import EvalSpec, TrainConfig, train

CAUSAL_TASKS = ("e2e",)  # causal-LM generation tasks (lora_jax.causal_lm); the rest are classification


# ---------------------------------------------------------------------------------------------------------------
# Provenance and processes
# ---------------------------------------------------------------------------------------------------------------


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
    module, params, tokenizer, model_config, lora, hf_task = build_model(cfg, task)
    causal, buckets, special = cfg.task in CAUSAL_TASKS, None, special_tokens(cfg, model_config)
    if causal:
        decode = decode_config(cfg)
        train_set, eval_sets, spec, buckets = causal_lm.e2e_datasets(cfg.data, decode, tokenizer, special)
    else:
        train_set, eval_sets, spec = _datasets(cfg, task, tokenizer, model_config, hf_task == "seq2seq-lm", special)
    export = Export(task=hf_task, base_model=cfg.model.name_or_path, tokenizer=tokenizer)
    summary = train(module, params, train_set, eval_sets, spec, config, out_dir, lora, _loggers(cfg, out_dir),
                    on_epoch=on_epoch, export=export, buckets=buckets)  # fmt: skip
    if causal:
        summary["outputs"] = causal_lm.keep_best_outputs(out_dir, decode.split, summary["best_epoch"])
        summary["train_rows"] = len(train_set["input_ids"])
    return _finish(cfg, task, lora, summary, out_dir, _model_type(model_config))


PACKED_KEYS = ("seed", "optim.lr", "lora.r", "lora.alpha", "run", "out_dir")  # what a packed sweep's runs vary


def run_packed(cfgs: Sequence[DictConfig], exact_dropout: bool = False) -> list[dict[str, Any]]:
    """The runs of a sweep over seed / optim.lr / lora.r / lora.alpha of one task and one method (LoRA or a
    baseline) trained as one program (lora_jax.sweep): each run's folder, metrics, summary and adapter are what
    `run` writes for it alone
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
    if cfgs[0].task in CAUSAL_TASKS or is_encoder_decoder(model_folder(cfgs[0].model.name_or_path)):
        raise ValueError("packed sweeps train classifiers; run seq2seq models and E2E unpacked.")
    started = [_start(cfg) for cfg in cfgs]
    task = started[0][0]
    runs, loaded = [], None
    for cfg, (_, config, out_dir) in zip(cfgs, started, strict=True):
        module, params, tokenizer, model_config, lora, hf_task = build_model(cfg, task)  # each seed its own head
        loaded = loaded or (module, tokenizer, model_config, hf_task)
        export = Export(task=hf_task, base_model=cfg.model.name_or_path, tokenizer=tokenizer)
        runs.append(SweepRun(params, config, lora, out_dir, _loggers(cfg, out_dir), export))
    module, tokenizer, model_config, _ = loaded
    special = special_tokens(cfgs[0], model_config)
    train_set, eval_sets, spec = _datasets(cfgs[0], task, tokenizer, model_config, False, special)
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


def build_model(cfg: DictConfig, task: Any) -> tuple[Any, Any, Any, Any, LoraConfig, str]:
    """(module, params wrapped for cfg.method (LoRA, adapter or prefix leaves), tokenizer, model config, LoRA config,
    HF task): what a run of this config trains, before training."""
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


def special_tokens(cfg: DictConfig, model_config: Any) -> SpecialTokens | None:
    """Prefix tuning's special tokens, which the data side inserts (ids past the vocabulary); None otherwise."""
    if cfg.method not in TOKEN_METHODS:
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
