"""Fine-tune a pretrained model on a GLUE (or text) task with LoRA, full fine-tuning or BitFit (the paper's Table 2).

    python experiments/run.py                                     # all-MiniLM-L6-v2 + LoRA on MRPC, minutes on a CPU
    python experiments/run.py +exp=glue_roberta task=rte lora.alpha=16
    python experiments/run.py -m seed=0,1,2,3,4 task=mrpc         # then: python experiments/aggregate.py exp=default
    python experiments/run.py method=full optim.lr=2e-5           # the full fine-tuning baseline
    python experiments/run.py exports=[adapter,peft,merged]       # also a PEFT adapter and a merged HF checkpoint

Writes results/<exp>/<task>/<run>/: config.yaml (resolved), metrics.jsonl (per epoch), train.jsonl (loss, lr),
summary.json, checkpoints/{latest,best}, adapter/ (and peft/, merged/). Running the same command again resumes.
The config's schema and resolvers live in lora_jax.config, the run itself in lora_jax.experiment; this file is
the Hydra entry point.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lora_jax.config import register_resolvers, store_schemas
from lora_jax.experiment import run
from lora_jax.lora import LoraError
from lora_jax.runbook import TrainingDiverged

register_resolvers()
store_schemas(ConfigStore.instance())  # conf/<group>/*.yaml extend these: `defaults: [schema, _self_]`

__all__ = ["best_or_exit", "main", "run"]


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
