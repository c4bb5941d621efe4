"""The same GLUE fine-tune as run.py, done by transformers + PEFT + PyTorch: the reference lora_jax must match.

    python experiments/peft_reference.py task=rte seed=1      # mirrors: python experiments/run.py task=rte seed=1

Same conf/ tree and command line as run.py. Shared with it, so the runs differ only in the model code: the rows
and tokens (load_glue, tokenize), the batch order (epoch_batches with the same seed and epoch), the loss over
real rows only, and the metrics. The optimizer and schedule are torch's and transformers' own (AdamW,
get_linear_schedule_with_warmup), set up to equal lora_jax.objective's: decay only on >= 2-D params, linear warmup
over int(warmup_ratio * steps) then linear decay to 0. What stays different is what is meant to be seed noise:
the random init of LoRA A and of a fresh head, and the dropout masks.

Writes results/<exp>/<task>/peft_<run>/: config.yaml, metrics.jsonl (per epoch), train.jsonl (loss, lr),
summary.json (run.py's keys plus "framework") and, for method=lora, adapter/ (PEFT format, best epoch).
It does not checkpoint: running the command again starts the run over.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from run import best_or_exit  # importing run also registers the config schema and resolvers
from tqdm.auto import tqdm

from lora_jax.config import lora_config_for, model_folder, model_name, train_config
from lora_jax.data import ClassificationTask, get_task, glue_metrics, load_glue, predictions_from_logits, tokenize
from lora_jax.data.batching import epoch_batches, eval_batches, num_batches
from lora_jax.experiment import git_commit
from lora_jax.logging import JsonlLogger
from lora_jax.lora import LoraConfig
from lora_jax.models.hub import load_tokenizer, resolve
from lora_jax.runbook import TrainingDiverged
from lora_jax.tree import matches_leaf

# Placed before the user's overrides (a later one wins): results, and Hydra's own files, go to peft_<run>, so a
# reference run never writes into the lora_jax run folder it is compared with.
PEFT_OUTPUT = [
    "out_dir=${results_dir}/${exp_name}/${task}/peft_${run}",
    "hydra.sweep.subdir=peft_${run}",
]


def peft_target_modules(lora: LoraConfig) -> str:
    """lora_jax's targets as one PEFT regex: PEFT full-matches it against module paths, and lora_jax's rule
    (a pattern matches a trailing run of whole components) is exactly that full match after an optional prefix."""
    if "all-linear" in lora.targets:
        return "all-linear"
    return rf"(?:.*\.)?(?:{'|'.join(lora.targets)})"


def build_model(
    cfg: DictConfig, task: ClassificationTask, lora: LoraConfig | None = None
) -> tuple[Any, Any, LoraConfig]:
    """(model, tokenizer, lora config): the HF classifier, PEFT-wrapped for method=lora, with requires_grad set
    on exactly the params lora_jax.methods.trainable_mask trains."""
    import torch
    from transformers import AutoModelForSequenceClassification

    folder = resolve(model_folder(cfg.model.name_or_path))
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=task.num_labels, dtype=getattr(torch, cfg.model.param_dtype)
    )
    if cfg.model.remat:
        model.gradient_checkpointing_enable()
    lora = lora or lora_config_for(cfg, model.config.model_type)
    if cfg.method == "lora":
        import peft

        peft_config = peft.LoraConfig(
            task_type="SEQ_CLS",
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=peft_target_modules(lora),
            bias=lora.bias,
            use_rslora=lora.rslora,
            init_lora_weights=True if lora.init == "kaiming" else "gaussian",
            modules_to_save=list(lora.train_also),
        )
        model = peft.get_peft_model(model, peft_config)
        if cfg.init_from:
            load_lora_from(model, Path(cfg.init_from))
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(
                cfg.method == "full"
                or name.rsplit(".", 1)[-1] == "bias"
                or any(matches_leaf(p, name) for p in lora.train_also)
            )
    return model, load_tokenizer(folder), lora


def load_lora_from(model: Any, run_dir: Path) -> None:
    """The LoRA weights (not the head) of an earlier peft_reference run, as run.py's init_from does."""
    import peft
    from safetensors.torch import load_file

    file = run_dir / "adapter" / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"No {file}: init_from must be a peft_reference run folder (…/peft_<run>).")
    state = {k: v for k, v in load_file(file).items() if ".lora_" in k}
    peft.set_peft_model_state_dict(model, state)
    print(f"LoRA leaves initialised from {run_dir}")


def count_params(model: Any) -> tuple[int, int]:
    """(trainable, total) as lora_jax counts them: PEFT's frozen copy of each modules_to_save module is not a
    parameter of the model being trained, so it is left out of the total."""
    trainable = total = 0
    for name, param in model.named_parameters():
        if "original_module" in name.split("."):
            continue
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def make_optimizer(model: Any, cfg: DictConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW + linear warmup/decay, equal to lora_jax.objective.make_optimizer (optax's defaults are torch's)."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(0.9, 0.999), eps=1e-8)
    warmup = int(cfg.optim.warmup_ratio * total_steps)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def to_torch(batch: dict[str, np.ndarray], device: Any) -> dict[str, Any]:
    import torch

    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: torch.as_tensor(batch[k], dtype=torch.long, device=device) for k in keys if k in batch}


def batch_loss(logits: Any, batch: dict[str, np.ndarray], num_labels: int) -> Any:
    """Weighted mean cross-entropy, or squared error for regression: filler rows (weight 0) add nothing."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    weights = torch.as_tensor(batch["weights"], device=logits.device)
    if num_labels == 1:
        per_example = (logits[:, 0] - torch.as_tensor(batch["labels"], device=logits.device).float()) ** 2
    else:
        labels = torch.as_tensor(batch["labels"], dtype=torch.long, device=logits.device)
        per_example = F.cross_entropy(logits, labels, reduction="none")
    return (per_example * weights).sum() / weights.sum().clamp(min=1.0)


def evaluate(model: Any, dataset: dict, task: ClassificationTask, batch_size: int, device: Any, autocast: Any) -> dict:
    import torch

    model.eval()
    logits = []
    with torch.no_grad():
        for batch in eval_batches(dataset, batch_size):
            with autocast():
                out = model(**to_torch(batch, device)).logits
            logits.append(out.float().cpu().numpy()[batch["weights"] > 0])
    model.train()
    predictions = predictions_from_logits(task.name, np.concatenate(logits))
    return glue_metrics(task.name, predictions, np.asarray(dataset["labels"]))


def run(cfg: DictConfig) -> dict[str, Any]:
    task = get_task(cfg.task)  # bad input fails here and below, before torch loads
    OmegaConf.resolve(cfg)
    if cfg.distributed:
        raise ValueError("peft_reference.py runs on one device; drop distributed=true.")
    config = train_config(cfg)  # validates the optim fields as run.py does
    cfg.model.name_or_path = model_name(cfg.model.name_or_path)  # recorded as the user named it, as run.py does

    import peft
    import torch
    import transformers

    torch.manual_seed(cfg.seed)
    # The cores this process may use (taskset), capped by OMP_NUM_THREADS when set: a pinned background lane next
    # to another run must not spread over both cores.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(min(cores, int(os.environ.get("OMP_NUM_THREADS", cores))))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = getattr(torch, cfg.model.dtype)
    autocast = lambda: torch.autocast(device.type, compute_dtype, enabled=compute_dtype != torch.float32)

    run_name = f"peft_{cfg.run}"
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))

    model, tokenizer, lora = build_model(cfg, task)
    model.to(device).train()
    n_trainable, n_total = count_params(model)
    print(f"trainable params: {n_trainable:,d} || all params: {n_total:,d}")

    def split(name: str) -> dict:
        return tokenize(load_glue(task.name, name, cfg.data.dir, cfg.data.source), tokenizer, cfg.data.max_len)

    train_set = split("train")
    eval_sets = {name: split(name) for name in task.dev_splits}
    main_key = task.main_metric if len(eval_sets) == 1 else f"{task.dev_splits[0]}/{task.main_metric}"

    steps_per_epoch = num_batches(train_set, config.batch_size)
    total_micro = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_micro = min(total_micro, config.max_steps)
    optimizer, scheduler = make_optimizer(model, cfg, math.ceil(total_micro / config.grad_accum))
    trainable = [p for p in model.parameters() if p.requires_grad]
    logger = JsonlLogger(out_dir)  # resume_step 0: a rerun starts the .jsonl files over

    history: list[dict[str, Any]] = []
    best, best_epoch, best_state, step, tokens = None, None, None, 0, 0
    bar = tqdm(total=total_micro, disable=not cfg.progress, dynamic_ncols=True, unit="step")
    started = time.perf_counter()
    for epoch in range(config.epochs):
        if step >= total_micro:
            break
        for batch in epoch_batches(train_set, config.batch_size, config.seed, epoch):
            with autocast():
                logits = model(**to_torch(batch, device)).logits
            loss_t = batch_loss(logits, batch, task.num_labels)
            (loss_t / config.grad_accum).backward()  # optax.MultiSteps averages the micro-batch gradients
            loss = loss_t.item()
            if not math.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss} at step {step} (epoch {epoch}). Lower optim.lr.")
            step += 1
            if step % config.grad_accum == 0:
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            tokens += int(np.sum(batch["attention_mask"] * batch["weights"][:, None]))
            lr = scheduler.get_last_lr()[0]  # the next update's lr, as run.py logs schedule(step)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            bar.update()
            if step % config.log_every == 0:
                logger.log({"step": step, "epoch": epoch, "loss": loss, "lr": lr}, "train")
            if step >= total_micro:
                break

        record: dict[str, Any] = {"step": step, "epoch": epoch}
        for name, dataset in eval_sets.items():
            scores = evaluate(model, dataset, task, config.eval_batch_size, device, autocast)
            prefix = "" if len(eval_sets) == 1 else f"{name}/"
            record.update({f"{prefix}{k}": v for k, v in scores.items()})
        history.append(record)
        logger.log(record, "metrics")
        shown = ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k not in ("step", "epoch"))
        bar.write(f"epoch {epoch}: {shown}")
        if best is None or record[main_key] > best:
            best, best_epoch = record[main_key], epoch
            if cfg.method == "lora":
                best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    bar.close()
    wall = time.perf_counter() - started

    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
        model.save_pretrained(out_dir / "adapter")
    summary = {
        "method": cfg.method,
        "main_metric": task.main_metric,
        "best": best,
        "best_epoch": best_epoch,
        "history": history,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "steps": step,
        "stopped_early": False,  # run.py's key; only its hyperparameter-search hook stops early
        "wall_time_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "padding_fraction": None,  # run.py's key; this loop pads every batch to its own longest row, uncounted
        "adapter": None,  # run.py's key: a bottleneck adapter's config (none here)
        "exports": {"adapter": "adapter"} if best_state is not None and cfg.method == "lora" else {},  # PEFT format
        "exp": cfg.exp_name,
        "task": cfg.task,
        "run": run_name,
        "seed": cfg.seed,
        "model": cfg.model.name_or_path,
        "lora": lora.to_dict() if cfg.method == "lora" else None,
        "git_commit": git_commit(),
        "devices": f"1 x {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1 + len(PEFT_OUTPUT) :]]),
        "framework": f"peft+torch peft {peft.__version__} torch {torch.__version__} "
        f"transformers {transformers.__version__}",
    }
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_dir / "summary.json")
    print(f"{cfg.task} {task.main_metric} = {best:.4f} (best epoch {best_epoch}) -> {out_dir}")
    return summary


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    """Returns the best main metric, as run.py's main does (in a sweep, errors propagate)."""
    return best_or_exit(run, cfg)


if __name__ == "__main__":
    sys.argv[1:1] = PEFT_OUTPUT
    main()
