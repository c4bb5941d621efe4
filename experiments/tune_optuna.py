"""Optuna search over LoRA hyperparameters that prunes bad trials after any epoch (TPE + median pruning).

    python experiments/tune_optuna.py +hparams_search=lora_optuna                      # MiniLM on MRPC, 20 trials
    python experiments/tune_optuna.py +exp=glue_minilm +hparams_search=lora_optuna task=rte hydra.sweeper.n_trials=40

Why not Hydra's Optuna sweeper (`run.py -m +hparams_search=lora_optuna`, which also works)? It only sees a job's
return value, so it cannot stop a hopeless trial after its first epoch. Here each trial reports its main metric
after every epoch (`trial.report`) through train's `on_epoch` hook and stops when the pruner says so. The search
space, trial count, direction and sampler are the sweeper's (hydra.sweeper in conf/hparams_search/), so both
paths search the same thing; the pruner is `tune.pruner`.

Writes results/<exp>/<task>/tune/optuna/: trial_<n>/ (a full run folder per trial), trials.json (params, state,
per-epoch values) and best_config.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run.py and search_space.py sit beside this file

from run import run  # noqa: E402
from search_space import parse_search_space, suggest_optuna, with_overrides  # noqa: E402

from lora_jax.data import task_from_config  # noqa: E402
from lora_jax.runbook import TrainingDiverged  # noqa: E402


def make_pruner(tune: DictConfig) -> optuna.pruners.BasePruner:
    """median: stop a trial whose best metric so far is below the median of finished trials at the same epoch.
    halving: asynchronous successive halving, the rule tune.py's ASHA applies. Both wait `grace_period` epochs."""
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=tune.grace_period)
    if tune.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=tune.grace_period, reduction_factor=tune.reduction_factor
        )
    if tune.pruner == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"tune.pruner must be median, halving or none, got {tune.pruner!r}.")


def trial_record(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "params": trial.params,
        "epoch_values": [v for _, v in sorted(trial.intermediate_values.items())],  # after epoch 1, 2, ...
        "seconds": trial.duration.total_seconds() if trial.duration else None,
    }


def search(cfg: DictConfig, sweeper: DictConfig, out: Path) -> optuna.Study:
    """Run the study; each trial is one run.py run in its own folder, reporting after every epoch."""
    if sweeper.direction != "maximize":
        raise ValueError("hydra.sweeper.direction must be maximize: run.py keeps the epoch with the highest metric.")
    space, fixed = parse_search_space(sweeper.params)
    study = optuna.create_study(
        study_name=sweeper.study_name,
        storage=sweeper.storage,  # e.g. sqlite:///tune.db: several processes share one study, a rerun resumes it
        load_if_exists=True,
        direction="maximize",
        sampler=instantiate(sweeper.sampler),
        pruner=make_pruner(cfg.tune),
    )
    for params in OmegaConf.to_container(cfg.tune.first_trials):  # e.g. the paper's setting, tried first
        study.enqueue_trial(params)

    def objective(trial: optuna.Trial) -> float:
        values = {**fixed, **suggest_optuna(trial, space)}
        trial_cfg = with_overrides(cfg, values, str(out / f"trial_{trial.number:03d}"))

        def report(epoch: int, metric: float, record: dict) -> bool:
            trial.report(metric, step=epoch + 1)  # steps count epochs trained, as Ray's training_iteration
            return trial.should_prune()

        summary = run(trial_cfg, on_epoch=report)
        if summary["stopped_early"]:
            raise optuna.TrialPruned(f"pruned after epoch {summary['history'][-1]['epoch']}")
        return summary["best"]

    study.optimize(objective, n_trials=sweeper.n_trials, catch=(TrainingDiverged,))
    return study


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    if "tune" not in cfg or "params" not in hydra_cfg.sweeper:
        raise SystemExit("error: no search space; add +hparams_search=lora_optuna.")
    out = Path(hydra_cfg.runtime.output_dir) / "optuna"
    out.mkdir(parents=True, exist_ok=True)
    study = search(cfg, hydra_cfg.sweeper, out)

    trials = [trial_record(t) for t in study.trials]
    (out / "trials.json").write_text(json.dumps(trials, indent=2))
    states = [t["state"] for t in trials]
    print(f"{len(trials)} trials: {states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned")
    best = study.best_trial
    result = {
        "metric": task_from_config(cfg.task, cfg.data).main_metric,
        "value": best.value,
        "params": best.params,
        "trial": best.number,
        "run_dir": str(out / f"trial_{best.number:03d}"),  # its config.yaml holds the whole resolved config
    }
    (out / "best_config.json").write_text(json.dumps(result, indent=2))
    print(f"best: {best.value:.4f} with {best.params} -> {out / 'best_config.json'}")
    return best.value


if __name__ == "__main__":
    main()
