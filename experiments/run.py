"""Fine-tune a pretrained encoder on a GLUE task with LoRA, full fine-tuning or BitFit (the paper's Table 2).

    python experiments/run.py                                     # all-MiniLM-L6-v2 + LoRA on MRPC, minutes on a CPU
    python experiments/run.py +exp=glue_roberta task=rte lora.alpha=16
    python experiments/run.py -m seed=0,1,2,3,4 task=mrpc         # then: python experiments/aggregate.py
    python experiments/run.py method=full optim.lr=2e-5           # the full fine-tuning baseline

Writes results/<exp>/<task>/<run>/: config.yaml (resolved), metrics.jsonl (per epoch), train.jsonl (loss, lr),
summary.json, checkpoints/{latest,best}, adapter/. Running the same command again resumes the run.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import jax
import jax.numpy as jnp
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lora_jax.adapters import load_adapter
from lora_jax.data import glue_metrics, load_split, predictions_from_logits, task_from_config, tokenize
from lora_jax.data.seq2seq import text_to_text_metrics, tokenize_text_to_text
from lora_jax.logging import WandbLogger
from lora_jax.lora import LoraConfig, LoraError, count_params, lora_wrap
from lora_jax.models.hub import from_pretrained, lora_config, resolve
from lora_jax.models.seq2seq_generate import eval_generator
from lora_jax.train import EvalSpec, TrainConfig, TrainingDiverged, train


def run_name(method: str, r: int, alpha: float, seed: int) -> str:
    """lora_r8_a16_seed0, full_seed0, bitfit_seed0: what a results folder is called."""
    return f"lora_r{r}_a{alpha:g}_seed{seed}" if method == "lora" else f"{method}_seed{seed}"


OmegaConf.register_new_resolver(
    "package_model", lambda name: str(importlib.import_module(name).get_model_path()), replace=True
)
OmegaConf.register_new_resolver("run_name", run_name, replace=True)
# Table 5 keeps the LoRA parameter count fixed: with all adapted matrices d x d, k weight types get rank r_total / k.
OmegaConf.register_new_resolver("budget_rank", lambda total, targets: max(1, int(total) // len(targets)), replace=True)
OmegaConf.register_new_resolver("join", lambda items: "".join(str(i) for i in items), replace=True)


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def is_encoder_decoder(name_or_path: str) -> bool:
    """T5/mT0-style checkpoints train text-to-text; the rest get a classification head."""
    config_file = resolve(name_or_path) / "config.json"
    return config_file.exists() and bool(json.loads(config_file.read_text()).get("is_encoder_decoder"))


def train_config(cfg: DictConfig) -> TrainConfig:
    o = cfg.optim
    return TrainConfig(
        method=cfg.method, epochs=o.epochs, batch_size=o.batch_size, eval_batch_size=o.eval_batch_size,
        learning_rate=o.lr, warmup_ratio=o.warmup_ratio, weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm, grad_accum=o.grad_accum, seed=cfg.seed,
        save_every_steps=o.save_every_steps, max_steps=o.max_steps, fsdp=o.fsdp, log_every=o.log_every,
        progress=cfg.progress,
    )  # fmt: skip


def lora_config_for(cfg: DictConfig, model_type: str) -> LoraConfig:
    """The run's LoraConfig, with the paper's target names expanded for the model family."""
    return lora_config(
        model_type,
        targets=list(cfg.lora.targets),
        r=cfg.lora.r,
        alpha=cfg.lora.alpha,
        dropout=cfg.lora.dropout,
        init=cfg.lora.init,
        rslora=cfg.lora.rslora,
        bias=cfg.lora.bias,
        train_also=list(cfg.model.train_also),
    )


def run(cfg: DictConfig, on_epoch: Callable[[int, float, dict], bool] | None = None) -> dict[str, Any]:
    """One fine-tuning run; `on_epoch` goes to `train` (the hook hyperparameter searches prune through)."""
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every save at INFO
    task = task_from_config(cfg.task, cfg.data)  # an unknown task fails here, before anything loads
    OmegaConf.resolve(cfg)
    if cfg.distributed:
        jax.distributed.initialize()
    if cfg.get("compilation_cache"):  # seeds and reruns of a config reuse XLA programs instead of recompiling
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compilation_cache))
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    config = train_config(cfg)

    seq2seq = is_encoder_decoder(cfg.model.name_or_path)
    module, params, tokenizer, model_config = from_pretrained(
        cfg.model.name_or_path,
        task="seq2seq-lm" if seq2seq else "sequence-classification",
        num_labels=None if seq2seq else task.num_labels,
        dtype=jnp.dtype(cfg.model.dtype),
        param_dtype=jnp.dtype(cfg.model.param_dtype),
        seed=cfg.seed,
        lora_dropout=cfg.lora.dropout,
        remat=cfg.model.remat,
        **(OmegaConf.to_container(cfg.model.overrides) if cfg.model.get("overrides") else {}),
    )
    lora = lora_config_for(cfg, model_config.model_type)
    if cfg.method == "lora":
        params = lora_wrap(params, lora, jax.random.key(cfg.seed))
        if cfg.init_from:
            params, _ = load_adapter(Path(cfg.init_from) / "adapter", params, lora_only=True)
            print(f"LoRA leaves initialised from {cfg.init_from}")
        print(count_params(params, lora))

    s2s = cfg.seq2seq

    def split(name: str) -> dict:
        rows = load_split(task, name, cfg.data)
        if seq2seq:
            return tokenize_text_to_text(
                rows, task, tokenizer, cfg.data.max_len, model_config.decoder_start_token_id, s2s.label_words,
                s2s.prefix,
            )  # fmt: skip
        return tokenize(rows, tokenizer, cfg.data.max_len)

    train_set = split("train")
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
    loggers = []
    if cfg.logger.kind == "wandb":
        loggers.append(
            WandbLogger(
                out_dir,
                OmegaConf.to_container(cfg),
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                group=f"{cfg.exp_name}/{cfg.task}",
                name=cfg.run,
                mode=cfg.logger.mode,
                tags=list(cfg.logger.tags),
            )  # fmt: skip
        )
    summary = train(module, params, train_set, eval_sets, spec, config, out_dir, lora, loggers, on_epoch=on_epoch)
    summary.update(
        exp=cfg.exp_name, task=cfg.task, run=cfg.run, seed=cfg.seed, model=cfg.model.name_or_path,
        lora=lora.to_dict() if cfg.method == "lora" else None, git_commit=git_commit(),
        devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    )  # fmt: skip
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_dir / "summary.json")
    print(
        f"{cfg.task} {task.main_metric} = {summary['best']:.4f} (best epoch {summary['best_epoch']}) -> {out_dir}"
    )
    return summary


def best_or_exit(run_fn: Any, cfg: DictConfig) -> float:
    """The run's best main metric, or one `error:` line and exit 2 for bad input. In a sweep errors propagate, so
    the sweeper records a failed trial instead of the whole sweep exiting (LORA_JAX_DEBUG=1: always raise)."""
    try:
        return run_fn(cfg)["best"]
    except (LoraError, TrainingDiverged, OSError, ValueError, TypeError) as e:
        if os.environ.get("LORA_JAX_DEBUG") or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    """Returns the best main metric: what a Hydra sweeper (hparams_search=lora_optuna) maximises."""
    return best_or_exit(run, cfg)


if __name__ == "__main__":
    main()
