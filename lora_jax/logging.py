"""Where run metrics go: JSONL files in the run folder, and optionally Weights & Biases (imported lazily).

A run resumed from step k first drops the records it had logged after k, so a crash and a rerun leave the
same files as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol


class Logger(Protocol):
    def log(self, record: Mapping[str, Any], stream: str = "train") -> None: ...

    def finish(self, summary: Mapping[str, Any]) -> None: ...


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


class JsonlLogger:
    """`<dir>/<stream>.jsonl`, one record a line, flushed at once (a crash loses nothing written)."""

    def __init__(self, directory: str | os.PathLike, resume_step: int = 0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in self.directory.glob("*.jsonl"):
            kept = [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: Mapping[str, Any], stream: str = "train") -> None:
        with open(self.directory / f"{stream}.jsonl", "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")

    def finish(self, summary: Mapping[str, Any]) -> None:
        del summary


class WandbLogger:
    """The same records in wandb, grouped so runs of one experiment and task sit side by side.

    `mode="offline"` works with no network (sync later with `wandb sync`); the run id is stable per run
    folder, so a resumed run continues the same wandb run.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        config: Mapping[str, Any],
        project: str,
        group: str,
        name: str,
        mode: str = "online",
        entity: str | None = None,
        tags: Sequence[str] = (),
    ):
        import hashlib

        import wandb  # lazily: the library must work without it

        run_id = hashlib.sha1(str(Path(directory).resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            name=name,
            id=run_id,
            resume="allow",
            mode=mode,
            dir=str(directory),
            config=dict(config),
            tags=list(tags),
        )

    def log(self, record: Mapping[str, Any], stream: str = "train") -> None:
        step = record.get("step")
        self.run.log({f"{stream}/{k}": self._value(v) for k, v in record.items() if k != "step"}, step=step)

    @staticmethod
    def _value(value: Any) -> Any:
        """A list of records (decoded samples) as a wandb.Table, anything else as it is."""
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            import wandb

            columns = list(value[0])
            return wandb.Table(columns=columns, data=[[_jsonable(v.get(c)) for c in columns] for v in value])
        return _jsonable(value)

    def finish(self, summary: Mapping[str, Any]) -> None:
        for k, v in summary.items():
            if isinstance(v, (int, float, str, bool)):
                self.run.summary[k] = v
        self.run.finish()


class Loggers:
    """Fan out to several loggers."""

    def __init__(self, *loggers: Logger):
        self.loggers = loggers

    def log(self, record: Mapping[str, Any], stream: str = "train") -> None:
        for logger in self.loggers:
            logger.log(record, stream)

    def finish(self, summary: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.finish(summary)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
