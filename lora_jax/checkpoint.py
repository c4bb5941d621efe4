"""Orbax checkpoints of a run: `latest` (everything needed to resume) and `best` (trainable params only).

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a run killed at any moment
leaves the previous checkpoint intact. Only the trainable half of the params is stored: the frozen half is the
pretrained model, which the run reloads anyway (for LoRA that is ~0.3% of the bytes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _manager(directory: Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.resolve(), options=options)


def abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of a tree: what a restore needs to place arrays where they belong."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class RunCheckpoints:
    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.latest = _manager(self.directory / "latest")
        self.best = _manager(self.directory / "best")

    def save_latest(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self.latest.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self.latest.wait_until_finished()

    def restore_latest(self, like: Any) -> tuple[Any, dict[str, Any]] | None:
        """(state, meta) of the newest complete checkpoint, placed like `like`; None when there is none."""
        step = self.latest.latest_step()
        if step is None:
            return None
        restored = self.latest.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract(like)), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def save_best(self, step: int, trainable: Any, meta: dict[str, Any]) -> None:
        self.best.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(trainable), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self.best.wait_until_finished()

    def restore_best(self, like: Any) -> Any:
        step = self.best.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"No best checkpoint under {self.directory / 'best'}; the run never evaluated."
            )
        restored = self.best.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract(like)), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"]

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def kept_outputs(
    compute: Callable[[Mapping[str, Any]], np.ndarray],
    batches: Iterable[Mapping[str, Any]],
    keep: str | os.PathLike | None = None,
) -> list[np.ndarray]:
    """`compute(batch)` for every batch, in order. With `keep` (a folder), each result is saved there as
    <i>.npy once computed (written whole, then renamed) and read back instead of recomputed on a rerun, so a long
    decode of a test set killed midway resumes where it stopped."""
    folder = None if keep is None else Path(keep)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    outputs = []
    for i, batch in enumerate(batches):
        path = None if folder is None else folder / f"{i:05d}.npy"
        if path is not None and path.exists():
            outputs.append(np.load(path))
            continue
        out = np.asarray(compute(batch))
        if path is not None:
            partial = path.with_suffix(".tmp.npy")
            np.save(partial, out)
            os.replace(partial, path)
        outputs.append(out)
    return outputs
