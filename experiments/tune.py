"""Ray Tune search over LoRA hyperparameters with the ASHA scheduler: trials in parallel, bad ones stopped early.

    python experiments/tune.py +hparams_search=lora_optuna                                  # all local CPUs
    python experiments/tune.py +hparams_search=lora_optuna tune.gpus_per_trial=0.5          # two trials per GPU
    python experiments/tune.py +hparams_search=lora_optuna tune.ray_address=auto            # on a Ray cluster

The search space and trial count are hydra.sweeper's in conf/hparams_search/ (the same space the Optuna paths
search), sampled at random (seeded by hydra.sweeper.sampler.seed). Each trial is one run.py run that reports its
main metric after every epoch (train's `on_epoch` hook -> `tune.report`); ASHA compares trials at epochs
grace_period * reduction_factor^k and stops those below the top 1/reduction_factor there. A stopped trial keeps
its checkpoints and metrics.jsonl, but no summary.json.

On a cluster every node needs this repository at the same path (a shared filesystem or the same image), the
data, and the model. Writes results/<exp>/<task>/tune/ray/: one folder per trial (Ray's files and the run's),
trials.json and best_config.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import ray
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

EXPERIMENTS = Path(__file__).resolve().parent
sys.path.insert(0, str(EXPERIMENTS))  # run.py and search_space.py sit beside this file

from search_space import parse_search_space, ray_tune_space  # noqa: E402

from lora_jax.config import store_schemas  # noqa: E402
from lora_jax.data import task_from_config  # noqa: E402

store_schemas(ConfigStore.instance())  # the run config's schema, as run.py registers it

METRIC = "main_metric"  # what every trial reports and ASHA compares: the task's main metric at this epoch


def train_trial(values: dict[str, Any], base: dict[str, Any], fixed: dict[str, Any], cwd: str) -> None:
    """One trial, inside a Ray worker: the run.py run with the sampled values, reporting after every epoch."""
    sys.path.insert(0, str(EXPERIMENTS))
    os.chdir(cwd)  # relative paths in the config (results/, data dirs) mean what they meant to the driver
    from run import run  # registers run.py's config resolvers in this worker
    from search_space import with_overrides

    trial_dir = tune.get_context().get_trial_dir()
    cfg = with_overrides(OmegaConf.create(base), {**fixed, **values}, trial_dir)

    def report(epoch: int, metric: float, record: dict) -> bool:
        tune.report({METRIC: metric, "epoch": epoch, **{k: v for k, v in record.items() if k != "epoch"}})
        return False  # ASHA stops a trial by ending its worker, not through this hook

    run(cfg, on_epoch=report)


def search(cfg: DictConfig, sweeper: DictConfig, out: Path) -> tune.ResultGrid:
    space, fixed = parse_search_space(sweeper.params)
    t = cfg.tune
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # JAX would take 75% of a GPU that trials may share
    local = {} if t.ray_address else {"num_cpus": t.num_cpus, "include_dashboard": False}  # a cluster has its own
    ray.init(address=t.ray_address, runtime_env={"env_vars": env}, **local)
    trainable = tune.with_parameters(
        train_trial, base=OmegaConf.to_container(cfg, resolve=False), fixed=fixed, cwd=os.getcwd()
    )
    scheduler = ASHAScheduler(
        max_t=cfg.optim.epochs, grace_period=t.grace_period, reduction_factor=t.reduction_factor
    )  # time_attr: training_iteration, i.e. epochs reported so far
    sampler = BasicVariantGenerator(
        points_to_evaluate=OmegaConf.to_container(t.first_trials) or None,
        max_concurrent=t.max_concurrent or 0,  # 0: as many as the resources allow
        random_state=sweeper.sampler.seed,
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": t.cpus_per_trial, "gpu": t.gpus_per_trial}),
        param_space=ray_tune_space(space),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", scheduler=scheduler, search_alg=sampler,
            num_samples=sweeper.n_trials,
        ),
        run_config=tune.RunConfig(name=out.name, storage_path=str(out.parent), verbose=1),
    )  # fmt: skip
    return tuner.fit()


def trial_record(result: tune.Result, max_t: int) -> dict[str, Any]:
    history = result.metrics_dataframe
    epochs = 0 if history is None else len(history)
    return {
        "trial": Path(result.path).name,
        "params": {k: v for k, v in result.config.items()},
        "epochs": epochs,
        "stopped_early": result.error is None and epochs < max_t,
        "error": None if result.error is None else str(result.error).splitlines()[0],
        "epoch_values": [] if history is None else [float(v) for v in history[METRIC]],  # after epoch 1, 2, ...
        "seconds": result.metrics.get("time_total_s"),
    }


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    if "tune" not in cfg or "params" not in hydra_cfg.sweeper:
        raise SystemExit("error: no search space; add +hparams_search=lora_optuna.")
    if hydra_cfg.sweeper.direction != "maximize":
        raise SystemExit("error: hydra.sweeper.direction must be maximize (run.py keeps the highest metric).")
    out = Path(hydra_cfg.runtime.output_dir).resolve() / "ray"
    results = search(cfg, hydra_cfg.sweeper, out)

    trials = [trial_record(r, cfg.optim.epochs) for r in results]
    (out / "trials.json").write_text(json.dumps(trials, indent=2))
    print(f"{len(trials)} trials: {sum(t['stopped_early'] for t in trials)} stopped early by ASHA")
    best = results.get_best_result(scope="all")  # the trial with the best epoch, as run.py picks epochs
    value = float(best.metrics_dataframe[METRIC].max())
    metric = task_from_config(cfg.task, cfg.data).main_metric
    result = {
        "metric": metric,
        "value": value,
        "params": best.config,
        "trial": Path(best.path).name,
        "run_dir": best.path,
    }
    (out / "best_config.json").write_text(json.dumps(result, indent=2))
    print(f"best: {value:.4f} with {best.config} -> {out / 'best_config.json'}")
    ray.shutdown()
    return value


if __name__ == "__main__":
    main()
