"""The fine-tuning loop's host side: reading losses back, scoring each epoch, keeping the best and latest checkpoints.

`RunBook` is what resumes with a run (its `meta`) plus the losses queued on the device and not yet read back;
`eval_and_checkpoint` ends every epoch of lora_jax.train's loop and of lora_jax.sweep's packed loop. Nothing here
computes a step: that is lora_jax.train.make_steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from lora_jax.checkpoint import RunCheckpoints, kept_outputs
from lora_jax.data.batching import eval_batches
from lora_jax.logging import Loggers
from lora_jax.methods import unpartition
from lora_jax.sharding import place_batch

if TYPE_CHECKING:
    from lora_jax.train import EvalSpec, Prepared, TrainConfig, TrainState

Params = Any
Batch = Mapping[str, np.ndarray]
EVAL_BATCHES = "eval_batches"  # a generating eval's kept batches, removed once its epoch's checkpoint is saved


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the last good checkpoint."""


def batch_tokens(batch: Batch) -> tuple[int, int]:
    """(real tokens, token slots) of a batch: the slots a filler row or a padded position takes count too."""
    masks = [batch[k] for k in ("attention_mask", "decoder_attention_mask") if k in batch]
    return int(sum(np.sum(m * batch["weights"][:, None]) for m in masks)), int(sum(m.size for m in masks))


def _to_host(x: jax.Array) -> np.ndarray:
    """A device array as numpy; on several hosts each holds only its rows, so gather them first."""
    if jax.process_count() > 1 and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def evaluate(
    eval_step: Callable[[Params, Params, Batch], jax.Array],
    trainable: Params,
    frozen: Params,
    dataset: Mapping[str, np.ndarray],
    spec: EvalSpec,
    batch_size: int,
    mesh: Mesh,
    keep: Path | None = None,
) -> dict[str, float]:
    """`spec.metrics` over every row's eval output; with `keep`, batches are kept as computed (resumable)."""

    def outputs(batch: Batch) -> np.ndarray:
        return _to_host(eval_step(trainable, frozen, place_batch(batch, mesh)))[batch["weights"] > 0]

    batches = eval_batches(dataset, batch_size, num_devices=mesh.devices.size)
    return spec.metrics(np.concatenate(kept_outputs(outputs, batches, keep)), np.asarray(dataset["labels"]))


def _generation_keep(run: RunBook, spec: EvalSpec, trainable: Params, name: str, step: int) -> Path | None:
    """Where a generating eval (minutes to hours: beam search over a test set) keeps its batches, so a run killed
    during it resumes the decode; named by the step and a digest of the params, so only the same params reuse it.
    Classification evals take seconds and keep nothing, nor do multi-process runs."""
    if spec.generate is None or jax.process_count() > 1:
        return None
    sums = jax.device_get(jax.tree.map(lambda x: jnp.sum(x, dtype=jnp.float32), trainable))
    digest = hashlib.sha1(np.asarray(jax.tree.leaves(sums), np.float32).tobytes()).hexdigest()[:12]
    return run.out_dir / EVAL_BATCHES / f"{name}_step{step}_{digest}"


@dataclasses.dataclass
class RunBook:
    """The loop's host-side bookkeeping: what resumes with the run (`meta`), and losses not yet read back."""

    out_dir: Path
    checkpoints: RunCheckpoints
    logger: Loggers
    meta: dict[str, Any]
    started: float
    pending: list[tuple[int, int, jax.Array]] = dataclasses.field(default_factory=list)  # (step, epoch, loss)
    last_loss: float | None = None

    def read_losses(self, schedule: optax.Schedule, config: TrainConfig) -> None:
        """Read the queued losses back (one transfer), stop on the first non-finite one, log every log_every-th."""
        if not self.pending:
            return
        values = jax.device_get([loss for _, _, loss in self.pending])
        for (step, epoch, _), loss in zip(self.pending, values, strict=True):
            loss = float(loss)
            if not math.isfinite(loss):
                last = self.checkpoints.latest.latest_step()
                raise TrainingDiverged(
                    f"loss became {loss} at step {step - 1} (epoch {epoch}); last good checkpoint: "
                    f"{self.out_dir / 'checkpoints' / 'latest'} at step {last}. "
                    "Lower optim.lr or set optim.max_grad_norm."
                )
            if step % config.log_every == 0:
                lr = float(schedule(step // config.grad_accum))
                self.logger.log({"step": step, "epoch": epoch, "loss": loss, "lr": lr}, "train")
            self.last_loss = loss
        self.pending.clear()

    def save_latest(self, state: TrainState, step: int) -> None:
        self.meta.update(step=step, wall_time=time.perf_counter() - self.started)
        self.checkpoints.save_latest(step, {"trainable": state.trainable, "opt_state": state.opt_state}, self.meta)


def eval_and_checkpoint(
    run: RunBook,
    prepared: Prepared,
    state: TrainState,
    eval_sets: Mapping[str, Batch],
    spec: EvalSpec,
    config: TrainConfig,
    mesh: Mesh,
    step: int,
    epoch: int,
) -> dict[str, Any]:
    """Score every eval set, keep the best trainable half, and save `latest` (after the eval, so a resumed run
    never evaluates an epoch twice)."""
    record: dict[str, Any] = {"step": step, "epoch": epoch}
    for name, dataset in eval_sets.items():
        keep = _generation_keep(run, spec, state.trainable, name, step)
        scores = evaluate(prepared.eval_step, state.trainable, prepared.frozen, dataset, spec,
                          config.eval_batch_size, mesh, keep)  # fmt: skip
        # Generation tasks also return their texts: all of them to a file per epoch, a few into the logs.
        if "decoded" in scores:
            (run.out_dir / "decoded").mkdir(exist_ok=True)
            (run.out_dir / "decoded" / f"{name}_epoch{epoch}.txt").write_text("\n".join(scores.pop("decoded")) + "\n")
        if "samples" in scores:
            run.logger.log({"step": step, "epoch": epoch, "split": name, "samples": scores.pop("samples")}, "samples")
        prefix = "" if len(eval_sets) == 1 else f"{name}/"
        record.update({f"{prefix}{k}": v for k, v in scores.items()})
    main_key = spec.main_metric if len(eval_sets) == 1 else f"{next(iter(eval_sets))}/{spec.main_metric}"
    record["main"] = record[main_key]
    run.meta["history"].append({k: v for k, v in record.items() if k != "main"})
    run.logger.log(run.meta["history"][-1], "metrics")
    if run.meta["best"] is None or record[main_key] > run.meta["best"]:
        run.meta.update(best=record[main_key], best_epoch=epoch)
        run.checkpoints.save_best(step, state.trainable, {"epoch": epoch, "metrics": run.meta["history"][-1]})
    run.save_latest(state, step)
    shutil.rmtree(run.out_dir / EVAL_BATCHES, ignore_errors=True)  # latest now says this eval is done
    return record


def best_params(run: RunBook, prepared: Prepared, state: TrainState) -> Any:
    """The best epoch's trainable half with the frozen half: on the devices, nothing copied to the host."""
    return unpartition(run.checkpoints.restore_best(state.trainable), prepared.frozen)
