"""One search space for every tuner: the `hydra.sweeper.params` of conf/hparams_search/*.yaml, in Hydra's sweep
syntax, read here into Optuna suggestions and Ray Tune samplers.

Hydra's Optuna sweeper reads those params itself; tune_optuna.py (Optuna with pruning) and tune.py (Ray Tune
with ASHA) read them through this file, so the three searches cannot drift apart.

    choice(2, 4, 8)                  -> a categorical
    interval(0.1, 0.5)               -> uniform float
    tag(log, interval(1e-4, 1e-1))   -> log-uniform float
    range(1, 5)                      -> a categorical over 1, 2, 3, 4
    3e-4                             -> a fixed value (applied to every trial)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from omegaconf import DictConfig, OmegaConf


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched config key: a categorical (`choices`) or a float in [low, high], maybe log-uniform."""

    key: str
    choices: tuple[Any, ...] = ()
    low: float = math.nan
    high: float = math.nan
    log: bool = False


def parse_search_space(params: Mapping[str, Any]) -> tuple[list[Param], dict[str, Any]]:
    """(searched params, fixed overrides) from `{config key: Hydra sweep string}`."""
    parser = OverridesParser.create()
    searched, fixed = [], {}
    for key, text in params.items():
        override = parser.parse_override(f"{key}={text}")
        value = override.value()
        if isinstance(value, IntervalSweep):
            searched.append(Param(key, low=float(value.start), high=float(value.end), log="log" in value.tags))
        elif isinstance(value, (ChoiceSweep, RangeSweep)):
            searched.append(Param(key, choices=tuple(override.sweep_iterator())))
        elif override.is_sweep_override():
            raise ValueError(f"{key}={text}: use choice(...), range(...) or [tag(log, )]interval(low, high).")
        else:
            fixed[key] = value
    if not searched:
        raise ValueError("the search space is empty: set hydra.sweeper.params (e.g. +hparams_search=lora_optuna).")
    return searched, fixed


def suggest_optuna(trial: Any, space: list[Param]) -> dict[str, Any]:
    """Ask an `optuna.Trial` for one value of each param."""
    return {
        p.key: trial.suggest_categorical(p.key, p.choices)
        if p.choices
        else trial.suggest_float(p.key, p.low, p.high, log=p.log)
        for p in space
    }


def ray_tune_space(space: list[Param]) -> dict[str, Any]:
    """The same space as Ray Tune samplers (`ray.tune` is imported only here, only when asked)."""
    from ray import tune

    def sampler(p: Param):
        if p.choices:
            return tune.choice(list(p.choices))
        return tune.loguniform(p.low, p.high) if p.log else tune.uniform(p.low, p.high)

    return {p.key: sampler(p) for p in space}


def with_overrides(cfg: DictConfig, values: Mapping[str, Any], out_dir: str) -> DictConfig:
    """A copy of `cfg` with the trial's values set and its own out_dir (trials never share, so never resume,
    each other's folder)."""
    trial = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key, value in {**values, "out_dir": out_dir}.items():
        OmegaConf.update(trial, key, value, merge=False)
    return trial
