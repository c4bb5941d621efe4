"""The fine-tuning loop: one jitted step over a device mesh, eval each epoch, checkpoints, resume.

The params are split once into a trainable and a frozen half (`lora.partition`). The step differentiates the
trainable half only, so XLA never computes gradients of frozen weights, and the optimizer keeps state for the
trainable leaves only. `method` picks the half: "lora" (LoRA leaves + `train_also`), "full" (everything, the
paper's FT baseline) or "bitfit" (biases + `train_also`), all through the same code.

Everything that decides a step's result is a function of (seed, step): batch order comes from (seed, epoch),
dropout from fold_in(seed, step). So a run killed at any point and started again with the same command resumes
from its latest checkpoint and ends with the same params as a run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from lora_jax.adapters import save_adapter
from lora_jax.checkpoint import RunCheckpoints
from lora_jax.data.batching import epoch_batches, eval_batches, num_batches
from lora_jax.logging import JsonlLogger, Logger, Loggers
from lora_jax.lora import LoraConfig, count_params, partition, trainable_mask, unpartition
from lora_jax.sharding import make_mesh, place_batch, shardings_for
from lora_jax.tree import map_with_path, matches_leaf

Params = Any
Batch = Mapping[str, np.ndarray]


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    method: Literal["lora", "full", "bitfit"] = "lora"
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 64
    learning_rate: float = 4e-4
    warmup_ratio: float = 0.06
    weight_decay: float = 0.1
    max_grad_norm: float | None = None
    grad_accum: int = 1
    seed: int = 0
    save_every_steps: int = 0  # 0: checkpoint at the end of each epoch only
    max_steps: int | None = None  # stop early (smoke runs)
    fsdp: bool = False  # shard params and optimizer state over the data axis (large models)
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full", "bitfit"):
            raise ValueError(f"method must be 'lora', 'full' or 'bitfit', got {self.method!r}.")
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """How to score a task: metrics from (logits, labels), and the metric that picks the best epoch."""

    num_labels: int  # 1: regression (STS-B)
    metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]]  # (eval_step outputs, dataset labels)
    main_metric: str
    # Seq2seq: eval_step generates, (module, params, batch) -> tokens, and `metrics` reads tokens, not logits.
    generate: Callable[[nn.Module, Params, Batch], jax.Array] | None = None


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces: what trains, the optimizer, the loss, the steps
# ---------------------------------------------------------------------------------------------------------------


def method_mask(params: Params, method: str, lora_config: LoraConfig | None) -> Any:
    """Which leaves train under `method` (LoRA scales and slice positions never do)."""
    if method == "lora":
        return trainable_mask(params, lora_config)
    also = lora_config.train_also if lora_config is not None else ()

    def trains(path: str) -> bool:
        name = path.rsplit(".", 1)[-1]
        if name.startswith("lora_"):
            return False
        if method == "full":
            return True
        return name == "bias" or any(matches_leaf(p, path) for p in also)

    return map_with_path(lambda path, _: trains(path), params)


def linear_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_ratio` of the steps, then linear decay to zero (the paper's schedule)."""
    warmup = int(config.warmup_ratio * total_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
            optax.linear_schedule(config.learning_rate, 0.0, max(total_steps - warmup, 1)),
        ],
        [warmup],
    )


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (no decay on biases and norms), optional clipping, gradient accumulation over micro-batches."""
    decay_mask = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)
    tx = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm else optax.identity(),
        optax.adamw(linear_schedule(config, total_steps), weight_decay=config.weight_decay, mask=decay_mask),
    )
    return optax.MultiSteps(tx, config.grad_accum) if config.grad_accum > 1 else tx


def batch_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array, num_labels: int) -> jax.Array:
    """Weighted mean cross-entropy, or squared error for regression; filler rows have weight 0.

    Labels of shape (batch, length) are target tokens (seq2seq): cross-entropy averaged over the real target
    tokens of the batch, positions labelled -100 skipped, as transformers' seq2seq models compute it.
    """
    logits = logits.astype(jnp.float32)
    if labels.ndim == 2:
        real = (labels != -100) * weights[:, None]
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0).astype(jnp.int32))
        return jnp.sum(per_token * real) / jnp.maximum(jnp.sum(real), 1.0)
    if num_labels == 1:
        per_example = jnp.square(logits[:, 0] - labels.astype(jnp.float32))
    else:
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "decoder_input_ids", "decoder_attention_mask")


def _model_inputs(batch: Batch) -> dict[str, Any]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def make_steps(
    module: nn.Module,
    tx: optax.GradientTransformation,
    num_labels: int,
    seed: int,
    generate: Callable[[nn.Module, Params, Batch], jax.Array] | None = None,
):
    """(train_step, eval_step), pure functions ready for jit. eval_step returns the logits, or with
    `generate(module, params, batch)` (seq2seq) the generated tokens."""
    base_key = jax.random.key(seed)

    def loss_fn(trainable, frozen, batch, step):
        params = unpartition(trainable, frozen)
        rngs = {"dropout": jax.random.fold_in(base_key, step)}
        out = module.apply({"params": params}, **_model_inputs(batch), deterministic=False, rngs=rngs)
        return batch_loss(out["logits"], batch["labels"], batch["weights"], num_labels)

    def train_step(trainable, opt_state, frozen, batch, step):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch, step)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    def eval_step(trainable, frozen, batch):
        params = unpartition(trainable, frozen)
        if generate is not None:
            return generate(module, params, batch)
        out = module.apply({"params": params}, **_model_inputs(batch), deterministic=True)
        return out["logits"].astype(jnp.float32)

    return train_step, eval_step


@dataclasses.dataclass
class Prepared:
    """Everything a loop (or a benchmark) needs to run the real step."""

    train_step: Callable  # (trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, loss)
    eval_step: Callable  # (trainable, frozen, batch) -> logits
    trainable: Any
    frozen: Any
    opt_state: Any


def prepare(
    module: nn.Module,
    params: Params,
    config: TrainConfig,
    num_labels: int,
    total_micro_steps: int,
    mesh: Mesh,
    lora_config: LoraConfig | None = None,
    generate: Callable[[nn.Module, Params, Batch], jax.Array] | None = None,
) -> Prepared:
    """Split the params by `config.method`, place both halves and the optimizer state on the mesh, and jit the
    steps (donating the trainable half and the optimizer state, so an update reuses their buffers)."""
    trainable, frozen = partition(params, method_mask(params, config.method, lora_config))
    tx = make_optimizer(config, math.ceil(total_micro_steps / config.grad_accum))
    train_sh = shardings_for(trainable, mesh, config.fsdp)
    trainable = jax.device_put(trainable, train_sh)
    frozen = jax.device_put(frozen, shardings_for(frozen, mesh, config.fsdp))
    opt_state = tx.init(trainable)
    opt_sh = shardings_for(opt_state, mesh, config.fsdp)
    opt_state = jax.device_put(opt_state, opt_sh)
    replicated = NamedSharding(mesh, PartitionSpec())
    train_step, eval_step = make_steps(module, tx, num_labels, config.seed, generate)
    train_step = jax.jit(train_step, out_shardings=(train_sh, opt_sh, replicated), donate_argnums=(0, 1))
    return Prepared(train_step, jax.jit(eval_step), trainable, frozen, opt_state)


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


def _tokens(batch: Batch) -> int:
    masks = [batch[k] for k in ("attention_mask", "decoder_attention_mask") if k in batch]
    return int(sum(np.sum(m * batch["weights"][:, None]) for m in masks))


def evaluate(
    eval_step, trainable, frozen, dataset, spec: EvalSpec, batch_size: int, mesh: Mesh
) -> dict[str, float]:
    logits = []
    for batch in eval_batches(dataset, batch_size, num_devices=mesh.devices.size):
        out = np.asarray(eval_step(trainable, frozen, place_batch(batch, mesh)))
        logits.append(out[batch["weights"] > 0])
    return spec.metrics(np.concatenate(logits), np.asarray(dataset["labels"]))


def train(
    module: nn.Module,
    params: Params,
    train_set: Mapping[str, np.ndarray],
    eval_sets: Mapping[str, Mapping[str, np.ndarray]],
    spec: EvalSpec,
    config: TrainConfig,
    out_dir: str | Path,
    lora_config: LoraConfig | None = None,
    loggers: Sequence[Logger] = (),
    mesh: Mesh | None = None,
    on_epoch: Callable[[int, float, dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """Fine-tune `params` (already LoRA-wrapped for method "lora"), resuming from `out_dir` if it holds a run.

    `on_epoch(epoch, main metric, metrics record)` runs after each epoch's eval and checkpoint; returning True
    ends training there (how a hyperparameter search prunes a trial; the summary says `stopped_early`).
    Returns the summary: best main metric and its epoch, per-epoch metrics, trainable params, wall time,
    tokens/s. Raises TrainingDiverged on a non-finite loss, keeping the last good checkpoint.
    """
    out_dir = Path(out_dir)
    mesh = mesh or make_mesh()
    n_dev = mesh.devices.size
    steps_per_epoch = num_batches(train_set, config.batch_size)
    total_micro = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_micro = min(total_micro, config.max_steps)
    schedule = linear_schedule(config, math.ceil(total_micro / config.grad_accum))
    prepared = prepare(module, params, config, spec.num_labels, total_micro, mesh, lora_config, spec.generate)
    train_step, eval_step = prepared.train_step, prepared.eval_step
    trainable, frozen, opt_state = prepared.trainable, prepared.frozen, prepared.opt_state

    checkpoints = RunCheckpoints(out_dir / "checkpoints")
    meta = {
        "step": 0,
        "epoch": 0,
        "history": [],
        "best": None,
        "best_epoch": None,
        "wall_time": 0.0,
        "tokens": 0,
        "step_time": 0.0,
    }
    restored = checkpoints.restore_latest({"trainable": trainable, "opt_state": opt_state})
    if restored is not None:
        state, meta = restored
        trainable, opt_state = state["trainable"], state["opt_state"]
        print(f"resuming {out_dir} from step {meta['step']} (epoch {meta['epoch']})")
    logger = Loggers(JsonlLogger(out_dir, resume_step=meta["step"]), *loggers)

    n_trainable = sum(int(np.size(x)) for x in jax.tree.leaves(trainable))
    step = meta["step"]
    stopped_early = False
    started = time.perf_counter() - meta["wall_time"]
    bar = tqdm(total=total_micro, initial=step, disable=not config.progress, dynamic_ncols=True, unit="step")

    def save_latest() -> None:
        meta.update(step=step, wall_time=time.perf_counter() - started)
        checkpoints.save_latest(step, {"trainable": trainable, "opt_state": opt_state}, meta)

    while step < total_micro and not stopped_early:
        epoch, skip = divmod(step, steps_per_epoch)
        meta["epoch"] = epoch
        for batch in epoch_batches(
            train_set, config.batch_size, config.seed, epoch, skip=skip, num_devices=n_dev
        ):
            tick = time.perf_counter()
            trainable, opt_state, loss = train_step(
                trainable, opt_state, frozen, place_batch(batch, mesh), jnp.asarray(step, jnp.int32)
            )
            loss = float(loss)
            if not math.isfinite(loss):
                last = checkpoints.latest.latest_step()
                raise TrainingDiverged(
                    f"loss became {loss} at step {step} (epoch {epoch}); last good checkpoint: "
                    f"{out_dir / 'checkpoints' / 'latest'} at step {last}. Lower optim.lr or set optim.max_grad_norm."
                )
            step += 1
            tokens = _tokens(batch)
            meta["tokens"] += tokens
            meta["step_time"] = meta.get("step_time", 0.0) + time.perf_counter() - tick
            lr = float(schedule(step // config.grad_accum))
            bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / (time.perf_counter() - tick):.0f}"
            )
            bar.update()
            if step % config.log_every == 0:
                logger.log({"step": step, "epoch": epoch, "loss": loss, "lr": lr}, "train")
            at_epoch_end = step % steps_per_epoch == 0  # saved after its eval, below
            if config.save_every_steps and step % config.save_every_steps == 0 and not at_epoch_end:
                save_latest()
            if step >= total_micro:
                break

        if step % steps_per_epoch == 0 or step >= total_micro:
            record: dict[str, Any] = {"step": step, "epoch": epoch}
            for name, dataset in eval_sets.items():
                scores = evaluate(eval_step, trainable, frozen, dataset, spec, config.eval_batch_size, mesh)
                prefix = "" if len(eval_sets) == 1 else f"{name}/"
                record.update({f"{prefix}{k}": v for k, v in scores.items()})
            main_key = (
                spec.main_metric if len(eval_sets) == 1 else f"{next(iter(eval_sets))}/{spec.main_metric}"
            )
            meta["history"].append(record)
            logger.log(record, "metrics")
            bar.write(
                f"epoch {epoch}: "
                + ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k not in ("step", "epoch"))
            )
            if meta["best"] is None or record[main_key] > meta["best"]:
                meta.update(best=record[main_key], best_epoch=epoch)
                checkpoints.save_best(step, trainable, {"epoch": epoch, "metrics": record})
            save_latest()
            if on_epoch is not None and on_epoch(epoch, record[main_key], record):
                stopped_early = step < total_micro
    bar.close()

    wall = time.perf_counter() - started
    counts = count_params(unpartition(trainable, frozen))
    summary = {
        "method": config.method,
        "main_metric": spec.main_metric,
        "best": meta["best"],
        "best_epoch": meta["best_epoch"],
        "history": meta["history"],
        "trainable_params": n_trainable,
        "total_params": counts.total,
        "steps": step,
        "stopped_early": stopped_early,
        "wall_time_s": wall,
        # Real (unpadded) tokens over time spent in steps: compiles and evals excluded.
        "tokens_per_s": meta["tokens"] / meta["step_time"] if meta.get("step_time") else None,
    }
    if config.method == "lora" and meta["best"] is not None:
        # The best epoch's adapter, in the format analysis tools and load_adapter read.
        best = unpartition(checkpoints.restore_best(trainable), frozen)
        save_adapter(out_dir / "adapter", jax.device_get(best), lora_config)
    logger.finish(summary)
    checkpoints.close()
    return summary
