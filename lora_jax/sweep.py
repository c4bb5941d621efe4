"""A sweep of K runs of one task trained as one program: the same per-run folders as K separate `train` calls.

The runs may differ in seed (LoRA / adapter / prefix init, head init, batch order, dropout), learning rate, and for
LoRA rank and alpha; all else is one TrainConfig, the method included (LoRA or any baseline of lora_jax.methods:
its trainable leaves are stacked as LoRA's are). Each run's trainable half (LoRA A/B and the head it trains) is
zero-padded to the largest rank and stacked on a leading K axis, with a 0/1 mask over the padding; the frozen base
is held once. One jitted step vmaps `lora_jax.packed.masked_update` (over lora_jax.objective's loss and optimizer)
across K, so every matmul of the base reads its weights once for all K runs. A padded slot gets a zero gradient
and a masked update, so it stays exactly zero and the real slots follow a separate run's arithmetic: the optimizer
runs with a peak rate of 1 and each run's update is scaled by its own rate, which equals the run's own schedule up
to float rounding.

Everything a separate run writes is written per run, by the same code: checkpoints hold each run's own
(unpadded) trainable half and optimizer state, so a packed sweep resumes from them, and each folder's
metrics.jsonl, train.jsonl, best checkpoint and exports are what `train` would have written there.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from lora_jax.checkpoint import RunCheckpoints
from lora_jax.data.batching import bucket_length, default_buckets, epoch_plan, num_batches, sequence_lengths, take
from lora_jax.export import Export, write_exports
from lora_jax.logging import JsonlLogger, Logger, Loggers
from lora_jax.lora import LoraConfig, LoraError, is_lora_leaf
from lora_jax.methods import count_params, partition, trainable_mask, unpartition
from lora_jax.objective import Batch, linear_schedule, make_loss, make_optimizer
from lora_jax.packed import masked_update
from lora_jax.runbook import RunBook, batch_tokens, best_params, eval_and_checkpoint
from lora_jax.sharding import make_mesh
from lora_jax.train import EvalSpec, Prepared, TrainConfig, TrainState, make_steps
from lora_jax.tree import Params, leaf_paths, map_with_path


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One run of a packed sweep: its lora_wrap'd params (own seed), config, LoRA config and folder."""

    params: Params
    config: TrainConfig
    lora_config: LoraConfig
    out_dir: Path
    loggers: Sequence[Logger] = ()
    export: Export | None = None


# ---------------------------------------------------------------------------------------------------------------
# Stacking trees of different ranks
# ---------------------------------------------------------------------------------------------------------------


def stack_padded(trees: Sequence[Any]) -> tuple[Any, Any]:
    """(stacked, mask): each leaf zero-padded to the largest shape among the trees and stacked on a new axis 0;
    mask is 1 where a tree had a value, 0 on its padding."""

    def padded(x: Any, shape: tuple[int, ...]) -> jax.Array:
        if np.shape(x) == shape:
            return jnp.asarray(x)
        return jnp.pad(jnp.asarray(x), [(0, n - m) for n, m in zip(shape, np.shape(x), strict=True)])

    def stack(*leaves: Any) -> jax.Array:
        shape = tuple(max(sizes) for sizes in zip(*(np.shape(x) for x in leaves), strict=True))
        return jnp.stack([padded(x, shape) for x in leaves])

    stacked = jax.tree.map(stack, *trees)
    mask = jax.tree.map(lambda *leaves: stack(*(jnp.ones(np.shape(x), jnp.float32) for x in leaves)), *trees)
    return stacked, mask


def unstack(stacked: Any, index: int, like: Any) -> Any:
    """Tree `index` of a stack, each leaf cut back to `like`'s shape (what stack_padded padded it from)."""
    return jax.tree.map(lambda s, x: s[index][tuple(slice(0, n) for n in np.shape(x))], stacked, like)


# ---------------------------------------------------------------------------------------------------------------
# The packed step
# ---------------------------------------------------------------------------------------------------------------


def packed_train_step(
    module: nn.Module, tx: optax.GradientTransformation, num_labels: int
) -> Callable[..., tuple[TrainState, jax.Array]]:
    """`(state, own, shared, batches, seeds, lrs, mask, active=None) -> (state, losses (K,))`, pure and ready for jit.

    state: a TrainState whose trainable and opt_state carry the K axis (step is shared); own: each run's frozen
    LoRA leaves (scale, slice, dropout rate) stacked; shared: the frozen base, held once; batches: (K, rows, ...);
    active: (K,) bool, runs whose batch this is (the others keep their state; None: all of them).
    """
    loss_fn = make_loss(module, num_labels)

    def loss_of(trainable: Any, own: Any, shared: Any, batch: Batch, seed: jax.Array, step: jax.Array):
        key = jax.random.fold_in(jax.random.key(seed), step)  # what a separate run of this seed draws
        return loss_fn(trainable, unpartition(own, shared), batch, key)

    update = masked_update(loss_of, tx)

    def step(
        state: TrainState,
        own: Any,
        shared: Any,
        batches: Batch,
        seeds: jax.Array,
        lrs: jax.Array,
        mask: Any,
        active: jax.Array | None = None,
    ) -> tuple[TrainState, jax.Array]:
        active = jnp.ones(seeds.shape, bool) if active is None else active
        vmapped = jax.vmap(update, in_axes=(0, 0, 0, 0, 0, 0, None, 0, 0, None))
        trainable, opt_state, losses = vmapped(
            state.trainable, state.opt_state, mask, lrs, active, own, shared, batches, seeds, state.step
        )
        return TrainState(trainable, opt_state, state.step + 1), losses

    return step


def _check(runs: Sequence[SweepRun]) -> None:
    if not runs:
        raise ValueError("a packed sweep needs at least one run.")
    unswept = lambda c: dataclasses.replace(c, seed=0, lr=1.0)  # noqa: E731
    first = unswept(runs[0].config)
    for run in runs:
        config = unswept(run.config)
        if config != first:
            diff = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(first, f.name)]
            raise ValueError(f"packed runs may differ only in seed, lr, r and alpha; {run.out_dir} differs in {diff}.")
        if config.fsdp or jax.process_count() > 1:
            raise ValueError("a packed sweep runs on one host without fsdp; launch such runs separately.")
    if len({str(r.out_dir) for r in runs}) < len(runs):
        raise ValueError("two packed runs share a folder; give each its own `run` name (seed, lr, r in it).")


def _split_frozen(frozens: Sequence[Any], names: Sequence[str]) -> tuple[list[Any], Any]:
    """(each run's frozen LoRA leaves, the frozen rest held once), refusing runs whose frozen base differs."""
    owns, rests = [], []
    for frozen in frozens:
        own, rest = partition(frozen, map_with_path(lambda path, _: is_lora_leaf(path), frozen))
        owns.append(own)
        rests.append(rest)
    first = dict(leaf_paths(rests[0]))
    for name, rest in zip(names[1:], rests[1:], strict=True):
        for path, leaf in leaf_paths(rest):
            if leaf is not first[path] and not np.array_equal(np.asarray(leaf), np.asarray(first[path])):
                raise LoraError(
                    f"{name}: frozen weight {path} differs from the first run's (a freshly initialised "
                    "module outside train_also?); add it to lora.train_also or run the sweep separately."
                )
    return owns, rests[0]


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


def _dropout_on(module: nn.Module, runs: Sequence[SweepRun]) -> bool:
    """Whether a step draws dropout masks: the model config's dropout rates or the runs' LoRA dropout."""
    config = getattr(module, "config", None)
    fields = dataclasses.fields(config) if dataclasses.is_dataclass(config) else ()
    rates = [getattr(config, f.name) for f in fields if "dropout" in f.name]
    lora_dropout = any(r.lora_config is not None and r.lora_config.dropout > 0 for r in runs)
    return any(isinstance(p, float) and p > 0 for p in rates) or lora_dropout


def _step_groups(dataset, batch_size: int, seeds: Sequence[int], epoch: int, skip: int, num_devices: int,
                 by_width: bool):  # fmt: skip
    """Each step's batches as [(active runs (K,) bool, (K, rows, width) batch)]: every run's own rows (its seed's
    order, as epoch_batches gives it), and each run's real-token count.

    One group by default: all runs cropped to the widest bucket among them (a run's extra columns are the
    dataset's own padding, masked out). `by_width`: one group per bucket width, each run in the group of its own
    width, as a separate run crops it, so each run draws the dropout masks a separate run would (a mask depends
    on the array's shape); runs outside a group get filler rows there and keep their state, so a step costs up to
    one full packed step per distinct width.
    """
    lengths, rows = sequence_lengths(dataset), -(-batch_size // num_devices) * num_devices
    buckets = default_buckets(dataset["attention_mask"].shape[1])
    plans = [epoch_plan(lengths, batch_size, seed, epoch)[skip:] for seed in seeds]
    for indices in zip(*plans, strict=True):
        widths = [bucket_length(int(lengths[i].max()), buckets) for i in indices]
        groups = sorted(set(widths)) if by_width else [max(widths)]
        tokens = [
            batch_tokens(take(dataset, i, rows, (w if by_width else groups[0],)))
            for i, w in zip(indices, widths, strict=True)
        ]  # (real, slots) at the width the run trains at
        steps = []
        for width in groups:
            active = np.array([w == width or not by_width for w in widths])
            filler = indices[int(np.argmax(active))]
            chosen = [i if on else filler for i, on in zip(indices, active, strict=True)]
            batches = [take(dataset, i, rows, (width,)) for i in chosen]
            steps.append((active, {key: np.stack([b[key] for b in batches]) for key in batches[0]}))
        yield steps, tokens


def train_packed(
    module: nn.Module,
    runs: Sequence[SweepRun],
    train_set: dict[str, np.ndarray],
    eval_sets: dict[str, dict[str, np.ndarray]],
    spec: EvalSpec,
    mesh: Any = None,
    exact_dropout: bool = False,
) -> list[dict[str, Any]]:
    """Train every run in `runs` at once; returns their summaries, each what `train` would return for it (plus
    `packed_with`, the folders trained together; wall and step times are the sweep's).

    With dropout off the runs follow K separate runs' arithmetic whatever the batch widths. With dropout on, each
    run draws its masks at the packed (widest) width: dropout of the same rate, but not the draw a separate run
    makes. `exact_dropout=True` steps once per distinct width instead, so every run draws a separate run's masks,
    at up to one packed step per width."""
    mesh = mesh or make_mesh()
    _check(runs)
    config = runs[0].config
    steps_per_epoch = num_batches(train_set, config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    opt_steps = math.ceil(total / config.grad_accum)
    tx = make_optimizer(dataclasses.replace(config, lr=1.0), opt_steps)
    schedules = [linear_schedule(r.config, opt_steps) for r in runs]

    halves = [partition(r.params, trainable_mask(r.params, r.lora_config, config.method)) for r in runs]
    trainables = [t for t, _ in halves]
    owns, shared = _split_frozen([f for _, f in halves], [str(r.out_dir) for r in runs])
    opt_states = [tx.init(t) for t in trainables]
    frozens = [unpartition(own, shared) for own in owns]

    # Per-run bookkeeping, exactly as train() keeps it; a sweep resumes only if all its runs stand at one step.
    started = time.perf_counter()
    books, states = [], []
    for run, trainable, opt_state in zip(runs, trainables, opt_states, strict=True):
        checkpoints = RunCheckpoints(Path(run.out_dir) / "checkpoints")
        meta = {"step": 0, "epoch": 0, "history": [], "best": None, "best_epoch": None, "wall_time": 0.0,
                "tokens": 0, "slots": 0, "step_time": 0.0}  # fmt: skip
        restored = checkpoints.restore_latest({"trainable": trainable, "opt_state": opt_state})
        if restored is not None:
            saved, meta = restored
            trainable, opt_state = saved["trainable"], saved["opt_state"]
        logger = Loggers(JsonlLogger(run.out_dir, resume_step=meta["step"]), *run.loggers)
        books.append(RunBook(Path(run.out_dir), checkpoints, logger, meta, started - meta["wall_time"]))
        states.append((trainable, opt_state))
    at = {str(b.out_dir): b.meta["step"] for b in books}
    if len(set(at.values())) > 1:
        raise ValueError(f"packed runs resume together, but they stand at different steps {at}; "
                         "finish them separately or delete their checkpoints/.")  # fmt: skip
    step = books[0].meta["step"]
    if step:
        print(f"resuming {len(runs)} packed runs from step {step}")

    trainable, mask = stack_padded([t for t, _ in states])
    opt_state, _ = stack_padded([o for _, o in states])
    own, _ = stack_padded(owns)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.device_put(TrainState(trainable, opt_state, jnp.asarray(step, jnp.int32)), replicated)
    shared, own, mask = jax.device_put((shared, own, mask), replicated)
    seeds = jnp.asarray([r.config.seed for r in runs], jnp.uint32)
    lrs = jnp.asarray([r.config.lr for r in runs], jnp.float32)
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, "data"))
    train_step = jax.jit(packed_train_step(module, tx, spec.num_labels), donate_argnums=(0,))
    _, eval_step = make_steps(module, tx, spec.num_labels, config.seed, spec.generate)
    eval_step = jax.jit(eval_step)
    by_width = exact_dropout and _dropout_on(module, runs)

    def run_view(k: int) -> tuple[Prepared, TrainState]:
        """Run k as train() holds it: its own unpadded trainable half and optimizer state."""
        like_t, like_o = states[k]
        view = TrainState(unstack(state.trainable, k, like_t), unstack(state.opt_state, k, like_o), state.step)
        return Prepared(None, eval_step, view, frozens[k]), view

    stopped_early = False
    bar = tqdm(total=total, initial=step, disable=not config.progress, dynamic_ncols=True, unit="step")
    pending: list[tuple[int, int, jax.Array]] = []
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        tick = time.perf_counter()
        for groups, tokens in _step_groups(train_set, config.batch_size, [r.config.seed for r in runs], epoch, skip,
                                           mesh.devices.size, by_width):  # fmt: skip
            losses = jnp.zeros(len(runs), jnp.float32)
            for active, stacked in groups:  # the step number advances once, after the last group
                state = state.replace(step=jax.device_put(jnp.asarray(step, jnp.int32), replicated))
                state, group_losses = train_step(state, own, shared, jax.device_put(stacked, batch_sharding), seeds,
                                                 lrs, mask, jax.device_put(active, replicated))  # fmt: skip
                losses = jnp.where(active, group_losses, losses)
            step += 1
            pending.append((step, epoch, losses))
            for book, (count, slots) in zip(books, tokens, strict=True):
                book.meta.update(epoch=epoch, tokens=book.meta["tokens"] + count,
                                 slots=book.meta.get("slots", 0) + slots)  # fmt: skip
            bar.update()
            last = step >= total or step % steps_per_epoch == 0
            periodic = config.save_every_steps and step % config.save_every_steps == 0 and not last
            if step % config.log_every == 0 or periodic or last:
                values = jax.device_get([loss for *_, loss in pending])
                for k, (book, run, schedule) in enumerate(zip(books, runs, schedules, strict=True)):
                    book.pending = [(s, e, v[k]) for (s, e, _), v in zip(pending, values, strict=True)]
                    book.read_losses(schedule, run.config)
                pending.clear()
                bar.set_postfix(loss=" ".join(f"{b.last_loss:.3f}" for b in books))
            if periodic:
                spent = time.perf_counter() - tick
                for k, book in enumerate(books):
                    book.meta["step_time"] += spent
                    book.save_latest(run_view(k)[1], step)
                tick = time.perf_counter()
            if step >= total:
                break
        spent = time.perf_counter() - tick
        for k, (book, run) in enumerate(zip(books, runs, strict=True)):
            book.meta["step_time"] += spent
            prepared, view = run_view(k)
            record = eval_and_checkpoint(book, prepared, view, eval_sets, spec, run.config, mesh, step, epoch)
            bar.write(f"{run.out_dir.name} epoch {epoch}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in record.items() if k not in ("step", "epoch", "main")))  # fmt: skip
    bar.close()

    summaries = []
    for k, (book, run) in enumerate(zip(books, runs, strict=True)):
        prepared, view = run_view(k)
        summary = {
            "method": run.config.method,
            "main_metric": spec.main_metric,
            "best": book.meta["best"],
            "best_epoch": book.meta["best_epoch"],
            "history": book.meta["history"],
            "trainable_params": sum(int(np.size(x)) for x in jax.tree.leaves(view.trainable)),
            "total_params": count_params(unpartition(view.trainable, frozens[k]), run.lora_config,
                                         run.config.method).total,
            "steps": step,
            "stopped_early": stopped_early,
            "wall_time_s": time.perf_counter() - book.started,
            "tokens_per_s": book.meta["tokens"] / book.meta["step_time"] if book.meta.get("step_time") else None,
            "padding_fraction": 1.0 - book.meta["tokens"] / book.meta["slots"] if book.meta.get("slots") else None,
            "packed_with": [str(r.out_dir) for r in runs],
        }
        if book.meta["best"] is not None:
            best = best_params(book, prepared, view)
            summary["exports"] = write_exports(run.out_dir, run.config.exports, best, run.lora_config, module,
                                               run.config.method, run.export or Export())  # fmt: skip
        book.logger.finish(summary)
        book.checkpoints.close()
        summaries.append(summary)
    return summaries
