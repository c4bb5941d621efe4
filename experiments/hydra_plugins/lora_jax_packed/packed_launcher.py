"""`hydra/launcher=packed`: a multirun over seed / optim.lr / lora.r / lora.alpha of one task as ONE program.

    python experiments/run.py -m hydra/launcher=packed +exp=glue_minilm_lrsel task=mrpc optim.lr=5e-4,1e-3,2e-3 seed=0,1
    python experiments/run.py -m hydra/launcher=packed +exp=glue_minilm_lrsel task=rte method=adapter_h seed=0,1,2
    ... hydra.launcher.exact_dropout=true   # each run's dropout masks those of a separate run (slower)

Hydra still sets every job up as its basic launcher does (its folder, .hydra/ with config, hydra and overrides);
then lora_jax.experiment.run_packed trains all the jobs' runs in one jitted step (lora_jax.sweep) and writes
each job's results folder as that job alone would have. Found by Hydra's plugin scan because experiments/ is on
sys.path when experiments/run.py runs and lora_jax_packed is a regular package (its __init__.py) inside the
hydra_plugins namespace package: the scan walks only regular packages. No `from __future__ import annotations`
here: the scan runs this module before it is in sys.modules, where dataclasses look string annotations up.
"""

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PackedLauncherConf:
    _target_: str = "hydra_plugins.lora_jax_packed.packed_launcher.PackedLauncher"
    # true: each run draws the dropout masks a separate run would (one step per distinct batch width, slower)
    exact_dropout: bool = False


ConfigStore.instance().store(group="hydra/launcher", name="packed", node=PackedLauncherConf)


class PackedLauncher(Launcher):
    def __init__(self, exact_dropout: bool = False) -> None:
        super().__init__()
        self.exact_dropout = exact_dropout
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        del task_function  # the jobs run together through run_packed, not one by one
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from lora_jax.config import register_resolvers
        from lora_jax.experiment import run_packed

        setup_globals()
        register_resolvers()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        log.info(f"Packing {len(job_overrides)} jobs into one program")
        cfgs: list[DictConfig] = []
        returns: list[JobReturn] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            collect: Any = lambda cfg: cfgs.append(cfg)  # noqa: E731  (run_job's per-job setup, no training)
            returns.append(run_job(hydra_context=self.hydra_context, task_function=collect, config=sweep_config,
                                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))  # fmt: skip
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        try:
            summaries = run_packed(cfgs, exact_dropout=self.exact_dropout)
        except Exception as e:  # every job of the program failed with it; the sweeper reports it
            for ret in returns:
                ret.status, ret.return_value = JobStatus.FAILED, e
            return returns
        for ret, summary in zip(returns, summaries, strict=True):
            ret.status, ret.return_value = JobStatus.COMPLETED, summary["best"]
        return returns
