"""The fine-tuning loop: one jitted step over a device mesh, eval each epoch, checkpoints, resume, exports.

In parts: `TrainState` (what changes between steps), `make_steps` (the pure step over lora_jax.objective's loss
and optimizer), the host-side bookkeeping (lora_jax.runbook's `RunBook` and `eval_and_checkpoint`, shared with
lora_jax.sweep), and the finish (`export.write_exports`). The step's loss stays on the device; the host reads the
queued losses back every `log_every` steps (and before any checkpoint, so none ever holds a diverged step), not
after every step.

The params are split once into a trainable and a frozen half (`methods.partition`). The step differentiates the
trainable half only, so XLA never computes gradients of frozen weights, and the optimizer keeps state for the
trainable leaves only. `methods.trainable_mask` picks the half for each `method`: "lora" (LoRA leaves +
`train_also`), "full" (everything, the paper's FT baseline), "bitfit" (biases + `train_also`), or one of the
paper's other baselines (lora_jax.bottleneck: adapter_h/l/p/d, ft_top2).

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
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from lora_jax.checkpoint import RunCheckpoints
from lora_jax.data.batching import epoch_batches, num_batches
from lora_jax.export import Export, check_exports, write_exports
from lora_jax.logging import JsonlLogger, Logger, Loggers
from lora_jax.lora import LoraConfig
from lora_jax.methods import METHODS, count_params, partition, trainable_mask, unpartition
from lora_jax.objective import linear_schedule, make_loss, make_optimizer, model_inputs
from lora_jax.runbook import RunBook, batch_tokens, best_params, eval_and_checkpoint
from lora_jax.sharding import make_mesh, place_batch, shardings_for, sync_processes

Params = Any
Batch = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train. The Hydra schema of `optim` is generated from these fields (lora_jax.config), so these
    defaults are the command line's; `method`, `seed`, `progress` and `exports` are top-level run keys there."""

    method: Literal[
        "lora", "full", "bitfit", "adapter_h", "adapter_l", "adapter_p", "adapter_d", "ft_top2", "prefix_embed",
        "prefix_layer", "prefix_kv",
    ] = "lora"
    epochs: int = 3
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 1e-3
    warmup_ratio: float = 0.06
    warmup_steps: int | None = None  # given, wins over warmup_ratio (the paper's E2E runs: 500 steps)
    label_smoothing: float = 0.0  # cross-entropy against (1 - s) one-hot + s / classes (the paper's E2E: 0.1)
    weight_decay: float = 0.1
    max_grad_norm: float | None = None
    grad_accum: int = 1
    seed: int = 0
    save_every_steps: int = 200  # 0: checkpoint at the end of each epoch only
    max_steps: int | None = None  # stop early (smoke runs)
    fsdp: bool = False  # shard params and optimizer state over the data axis (large models)
    log_every: int = 10  # also how often the loss is read back to the host (and checked for NaN)
    progress: bool = True
    exports: tuple[str, ...] = ("adapter",)  # of export.EXPORTS: adapter (LoRA runs), peft (LoRA), merged

    def __post_init__(self) -> None:
        object.__setattr__(self, "exports", tuple([self.exports] if isinstance(self.exports, str) else self.exports))
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}.")
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be >= 1, got {getattr(self, name)}.")
        if not (0 < self.lr < math.inf):
            raise ValueError(f"optim.lr must be > 0, got {self.lr}; LoRA's GLUE runs use 1e-4 .. 1e-3.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0 (or null: warmup_ratio), got {self.warmup_steps}.")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"optim.label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"optim.max_grad_norm must be > 0 (or null: no clipping), got {self.max_grad_norm}.")
        if self.save_every_steps < 0:
            raise ValueError(f"optim.save_every_steps must be >= 0 (0: each epoch's end), got {self.save_every_steps}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"optim.max_steps must be >= 1 (or null: all epochs), got {self.max_steps}.")
        check_exports(self.exports, self.method)


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """How to score a task: metrics from (logits, labels), and the metric that picks the best epoch."""

    num_labels: int  # 1: regression (STS-B)
    metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]]  # (eval_step outputs, dataset labels)
    main_metric: str
    # Seq2seq: eval_step generates, (module, params, batch) -> tokens, and `metrics` reads tokens, not logits.
    generate: Callable[[nn.Module, Params, Batch], jax.Array] | None = None


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces: the steps (the loss and the optimizer: lora_jax.objective)
# ---------------------------------------------------------------------------------------------------------------


@struct.dataclass
class TrainState:
    """What changes between steps: the trainable half of the params, the optimizer state, the step number."""

    trainable: Any
    opt_state: Any
    step: jax.Array  # int32; dropout masks are fold_in(seed, step)


def make_steps(
    module: nn.Module,
    tx: optax.GradientTransformation,
    num_labels: int,
    seed: int,
    generate: Callable[[nn.Module, Params, Batch], jax.Array] | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Callable[..., tuple[TrainState, jax.Array]], Callable[..., jax.Array]]:
    """(train_step, eval_step), pure functions ready for jit: train_step(state, frozen, batch) -> (state, loss),
    eval_step(trainable, frozen, batch) -> logits, or with `generate(module, params, batch)` (seq2seq) the
    generated tokens."""
    base_key = jax.random.key(seed)
    loss_fn = make_loss(module, num_labels, label_smoothing)

    def train_step(state: TrainState, frozen: Any, batch: Batch) -> tuple[TrainState, jax.Array]:
        dropout_key = jax.random.fold_in(base_key, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.trainable, frozen, batch, dropout_key)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return TrainState(trainable, opt_state, state.step + 1), loss

    def eval_step(trainable: Any, frozen: Any, batch: Batch):
        params = unpartition(trainable, frozen)
        if generate is not None:
            return generate(module, params, batch)
        out = module.apply({"params": params}, **model_inputs(batch), deterministic=True)
        return out["logits"].astype(jnp.float32)

    return train_step, eval_step


@dataclasses.dataclass
class Prepared:
    """Everything a loop (or a benchmark) needs to run the real step."""

    train_step: Callable  # (state, frozen, batch) -> (state, loss)
    eval_step: Callable  # (trainable, frozen, batch) -> logits
    state: TrainState
    frozen: Any


def prepare(
    module: nn.Module,
    params: Params,
    config: TrainConfig,
    num_labels: int,
    total_micro_steps: int,
    mesh: Mesh,
    lora_config: LoraConfig | None = None,
    generate: Callable[[nn.Module, Params, Batch], jax.Array] | None = None,
    mask: Any = None,
) -> Prepared:
    """Split the params by `config.method` (`methods.trainable_mask`; or by `mask`, a bool tree, for adapters attached
    some other way, e.g. a benchmark's Qwix model), place both halves and the optimizer state on the mesh, and jit
    the steps (donating the state, so an update reuses its buffers)."""
    mask = trainable_mask(params, lora_config, config.method) if mask is None else mask
    trainable, frozen = partition(params, mask)
    tx = make_optimizer(config, math.ceil(total_micro_steps / config.grad_accum))
    replicated = NamedSharding(mesh, PartitionSpec())
    sync_processes("place-params")  # placing across processes is the first collective
    trainable = jax.device_put(trainable, shardings_for(trainable, mesh, config.fsdp))
    frozen = jax.device_put(frozen, shardings_for(frozen, mesh, config.fsdp))
    opt_state = tx.init(trainable)
    opt_state = jax.device_put(opt_state, shardings_for(opt_state, mesh, config.fsdp))
    state = TrainState(trainable, opt_state, jax.device_put(jnp.zeros((), jnp.int32), replicated))
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    train_step, eval_step = make_steps(module, tx, num_labels, config.seed, generate, config.label_smoothing)
    train_step = jax.jit(train_step, out_shardings=(state_sh, replicated), donate_argnums=(0,))
    return Prepared(train_step, jax.jit(eval_step), state, frozen)


# ---------------------------------------------------------------------------------------------------------------
# The loop: steps, eval/checkpoint, finish
# ---------------------------------------------------------------------------------------------------------------


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
    export: Export | None = None,
    buckets: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Fine-tune `params` (already LoRA-wrapped for method "lora"), resuming from `out_dir` if it holds a run.

    `on_epoch(epoch, main metric, metrics record)` runs after each epoch's eval and checkpoint; returning True
    ends training there (how a hyperparameter search prunes a trial; the summary says `stopped_early`).
    `config.exports` picks what the best epoch is written as (`export` says the HF task and names the base
    model, which the PEFT and merged exports need). Returns the summary: best main metric and its epoch,
    per-epoch metrics, trainable params, wall time, tokens/s, padding fraction. `buckets`: the training batch
    lengths (batching.default_buckets of the width when None). Raises TrainingDiverged on a non-finite loss,
    keeping the last good checkpoint.
    """
    out_dir = Path(out_dir)
    mesh = mesh or make_mesh()
    steps_per_epoch = num_batches(train_set, config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    schedule = linear_schedule(config, math.ceil(total / config.grad_accum))
    prepared = prepare(module, params, config, spec.num_labels, total, mesh, lora_config, spec.generate)
    state = prepared.state

    checkpoints = RunCheckpoints(out_dir / "checkpoints")
    meta = {"step": 0, "epoch": 0, "history": [], "best": None, "best_epoch": None, "wall_time": 0.0,
            "tokens": 0, "slots": 0, "step_time": 0.0}  # fmt: skip
    restored = checkpoints.restore_latest({"trainable": state.trainable, "opt_state": state.opt_state})
    if restored is not None:
        saved, meta = restored
        step_number = jax.device_put(jnp.asarray(meta["step"], jnp.int32), state.step.sharding)
        state = TrainState(saved["trainable"], saved["opt_state"], step_number)
        print(f"resuming {out_dir} from step {meta['step']} (epoch {meta['epoch']})")
    main_process = jax.process_index() == 0
    logger = Loggers(JsonlLogger(out_dir, resume_step=meta["step"]), *loggers) if main_process else Loggers()
    run = RunBook(out_dir, checkpoints, logger, meta, time.perf_counter() - meta["wall_time"])

    step = meta["step"]
    stopped_early = False
    bar = tqdm(total=total, initial=step, disable=not (config.progress and main_process), dynamic_ncols=True,
               unit="step")  # fmt: skip
    while step < total and not stopped_early:
        epoch, skip = divmod(step, steps_per_epoch)
        meta["epoch"] = epoch
        tick = time.perf_counter()
        for batch in epoch_batches(train_set, config.batch_size, config.seed, epoch, skip=skip, buckets=buckets,
                                   num_devices=mesh.devices.size):  # fmt: skip
            state, loss = prepared.train_step(state, prepared.frozen, place_batch(batch, mesh))
            step += 1
            run.pending.append((step, epoch, loss))
            tokens, slots = batch_tokens(batch)
            meta["tokens"] += tokens
            meta["slots"] = meta.get("slots", 0) + slots
            bar.update()
            last = step >= total or step % steps_per_epoch == 0  # saved after its eval, below
            periodic = config.save_every_steps and step % config.save_every_steps == 0 and not last
            if step % config.log_every == 0 or periodic or last:
                run.read_losses(schedule, config)  # before any save: a checkpoint never holds a NaN step
                bar.set_postfix(loss=f"{run.last_loss:.4f}", lr=f"{float(schedule(step // config.grad_accum)):.2e}")
            if periodic:
                meta["step_time"] += time.perf_counter() - tick
                run.save_latest(state, step)
                tick = time.perf_counter()
            if step >= total:
                break
        meta["step_time"] += time.perf_counter() - tick
        record = eval_and_checkpoint(run, prepared, state, eval_sets, spec, config, mesh, step, epoch)
        bar.write(f"epoch {epoch}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in record.items() if k not in ("step", "epoch", "main")))  # fmt: skip
        if on_epoch is not None and on_epoch(epoch, record["main"], meta["history"][-1]):
            stopped_early = step < total
    bar.close()

    summary = {
        "method": config.method,
        "main_metric": spec.main_metric,
        "best": meta["best"],
        "best_epoch": meta["best_epoch"],
        "history": meta["history"],
        "trainable_params": sum(int(np.size(x)) for x in jax.tree.leaves(state.trainable)),
        "total_params": count_params(unpartition(state.trainable, prepared.frozen), lora_config, config.method).total,
        "steps": step,
        "stopped_early": stopped_early,
        "wall_time_s": time.perf_counter() - run.started,
        # Real (unpadded) tokens over time spent in steps: compiles and evals excluded.
        "tokens_per_s": meta["tokens"] / meta["step_time"] if meta.get("step_time") else None,
        # Token slots of the training batches that held padding (or filler rows): what bucketing leaves.
        "padding_fraction": 1.0 - meta["tokens"] / meta["slots"] if meta.get("slots") else None,
    }
    if meta["best"] is not None:
        best = best_params(run, prepared, state)
        summary["exports"] = write_exports(out_dir, config.exports, best, lora_config, module, config.method,
                                           export or Export())  # fmt: skip
    logger.finish(summary)
    checkpoints.close()
    return summary
