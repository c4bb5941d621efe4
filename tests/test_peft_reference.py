"""experiments/peft_reference.py (transformers + PEFT + torch) against experiments/run.py (lora_jax) on a tiny BERT:
the same results layout, trainable params and lr schedule, and, where nothing random differs, the same losses.

The tiny checkpoint includes its classification head and has dropout 0, so both frameworks start from the very
same function: a full fine-tune is then deterministic in both and must follow the same loss curve step by step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lora_jax.logging import read_jsonl
from lora_jax.lora import lora_wrap
from lora_jax.methods import count_params, trainable_mask
from lora_jax.models.hub import from_pretrained, lora_config
from lora_jax.objective import linear_schedule
from lora_jax.train import TrainConfig
from lora_jax.tree import leaf_paths
from tests.conftest import save_tiny_bert, write_tiny_mrpc

pytestmark = pytest.mark.slow  # peft_reference.py and run.py in subprocesses

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12  # 48 rows / batch 8 x 2 epochs


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), with_head=True, dropout=0.0)


@pytest.fixture(scope="module")
def tiny_glue(tmp_path_factory) -> Path:
    return write_tiny_mrpc(tmp_path_factory.mktemp("glue"))


def overrides(tiny_bert: Path, tiny_glue: Path, results: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={tiny_bert}",
        f"data.dir={tiny_glue}",
        f"results_dir={results}",
        "task=mrpc",
        "data.max_len=32",
        "optim.batch_size=8",
        "optim.epochs=2",
        "optim.lr=1e-3",
        "optim.warmup_ratio=0.25",  # 3 warmup steps of 12
        "optim.weight_decay=1.0",  # large, so decaying the wrong leaves would show in the losses
        "optim.max_grad_norm=0.05",  # small, so clipping acts at every step
        "optim.log_every=1",
        "lora.r=4",
        "progress=false",
        *extra,
    ]


def launch(script: str, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    env.pop("LORA_JAX_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "experiments" / script), *args],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_glue, tmp_path_factory) -> dict[str, Path]:
    """Run folders of three runs started together: lora_jax full FT, PEFT-side full FT, PEFT LoRA."""
    results = tmp_path_factory.mktemp("results")
    procs = {
        "jax_full": launch("run.py", overrides(tiny_bert, tiny_glue, results, "method=full")),
        "peft_full": launch("peft_reference.py", overrides(tiny_bert, tiny_glue, results, "method=full")),
        "peft_lora": launch("peft_reference.py", overrides(tiny_bert, tiny_glue, results)),
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
    task_dir = results / "default" / "mrpc"
    return {
        "results": results,
        "jax_full": task_dir / "full_seed0",
        "peft_full": task_dir / "peft_full_seed0",
        "peft_lora": task_dir / "peft_lora_r4_a8_seed0",
    }


def train_log(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in read_jsonl(run_dir / "train.jsonl")]


def test_results_layout_and_summary_keys_match_run_py(runs):
    lora_dir = runs["peft_lora"]
    assert {"config.yaml", "metrics.jsonl", "train.jsonl", "summary.json", "adapter", ".hydra"} <= {
        p.name for p in lora_dir.iterdir()
    }
    # Hydra's own files went to the peft_ folder, never into a lora_jax run folder.
    assert all(p.parent.name.startswith("peft_") for p in runs["results"].rglob("peft_reference.log"))
    summary = json.loads((lora_dir / "summary.json").read_text())
    jax_summary = json.loads((runs["jax_full"] / "summary.json").read_text())
    assert set(summary) == set(jax_summary) | {"framework"}
    assert summary["run"] == "peft_lora_r4_a8_seed0" and summary["framework"].startswith("peft+torch")
    assert summary["steps"] == STEPS and summary["lora"]["r"] == 4
    assert [r["epoch"] for r in summary["history"]] == [0, 1]
    assert summary["best"] == max(r["accuracy"] for r in summary["history"])
    assert summary["best_epoch"] == [r["accuracy"] for r in summary["history"]].index(summary["best"])
    assert summary["command"].startswith("peft_reference.py model.name_or_path=")
    metrics = read_jsonl(lora_dir / "metrics.jsonl")
    assert metrics == summary["history"] and {"accuracy", "f1"} <= set(metrics[0])
    adapter = json.loads((lora_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and {"classifier", "pooler"} <= set(adapter["modules_to_save"])


def test_trainable_params_equal_lora_jax(runs, tiny_bert):
    _, params, _, model_config = from_pretrained(tiny_bert, task="sequence-classification", num_labels=2)
    lora = lora_config(model_config.model_type, targets=["q", "v"], r=4, train_also=["classifier", "pooler"])
    expected = count_params(lora_wrap(params, lora, jax.random.key(0)), lora)
    summary = json.loads((runs["peft_lora"] / "summary.json").read_text())
    assert (summary["trainable_params"], summary["total_params"]) == (expected.trainable, expected.total)
    full, jax_full = (json.loads((runs[k] / "summary.json").read_text()) for k in ("peft_full", "jax_full"))
    assert (full["trainable_params"], full["total_params"]) == (jax_full["trainable_params"], jax_full["total_params"])


def test_lr_schedule_equals_lora_jax_at_every_step(runs):
    steps = train_log(runs["peft_full"], "step")
    assert steps == train_log(runs["jax_full"], "step") == list(range(1, STEPS + 1))
    assert train_log(runs["peft_full"], "epoch") == train_log(runs["jax_full"], "epoch")
    np.testing.assert_allclose(train_log(runs["peft_full"], "lr"), train_log(runs["jax_full"], "lr"), atol=1e-7, rtol=0)
    schedule = linear_schedule(TrainConfig(lr=1e-3, warmup_ratio=0.25), STEPS)
    expected = [float(schedule(s)) for s in steps]
    np.testing.assert_allclose(train_log(runs["peft_lora"], "lr"), expected, atol=1e-7, rtol=0)
    assert max(expected) == pytest.approx(1e-3) and expected[-1] == 0.0


def test_full_fine_tune_follows_lora_jax_step_by_step(runs):
    """Same start, same batches, same AdamW/decay/clipping/schedule: the loss curves agree to fp32 noise (1e-7
    here; decaying every leaf, or not clipping, moves them by 1e-4 and 5e-3)."""
    np.testing.assert_allclose(
        train_log(runs["peft_full"], "loss"), train_log(runs["jax_full"], "loss"), atol=5e-6, rtol=0
    )
    peft_history = json.loads((runs["peft_full"] / "summary.json").read_text())["history"]
    jax_history = json.loads((runs["jax_full"] / "summary.json").read_text())["history"]
    assert [(r["accuracy"], r["step"]) for r in peft_history] == [(r["accuracy"], r["step"]) for r in jax_history]


def test_lora_run_starts_as_the_base_model(runs):
    """B = 0 makes the LoRA model the base model, and the first update has lr 0 (warmup starts at 0), so the
    first two losses are the base model's on the first two batches, which the lora_jax full run also saw."""
    np.testing.assert_allclose(
        train_log(runs["peft_lora"], "loss")[:2], train_log(runs["jax_full"], "loss")[:2], atol=1e-6, rtol=0
    )
    assert train_log(runs["peft_lora"], "loss")[:2] != train_log(runs["peft_lora"], "loss")[2:4]


@pytest.fixture(scope="module")
def reference():
    """experiments/peft_reference.py as a module (it imports run.py from its own folder)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        spec = importlib.util.spec_from_file_location("peft_reference", ROOT / "experiments" / "peft_reference.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    return module


def compose(*extra: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=list(extra))


@pytest.mark.parametrize("targets", [["q", "v"], ["q", "k", "v", "o", "mlp"]])
def test_peft_adapts_the_modules_lora_jax_adapts(reference, tiny_bert, targets):
    from lora_jax.data import get_task

    cfg = compose(f"model.name_or_path={tiny_bert}", f"lora.targets=[{','.join(targets)}]")
    model, _, lora = reference.build_model(cfg, get_task("mrpc"))
    peft_modules = {
        n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
        for n, _ in model.named_parameters()
        if n.endswith(".lora_A.default.weight")
    }
    _, params, _, _ = from_pretrained(tiny_bert, task="sequence-classification", num_labels=2)
    wrapped = lora_wrap(params, lora, jax.random.key(0))
    ours = {p.removesuffix(".lora_a") for p, _ in leaf_paths(wrapped) if p.endswith(".lora_a")}
    assert peft_modules == ours and len(ours) == 2 * len(targets) + (2 if "mlp" in targets else 0)


def test_bitfit_trains_what_lora_jax_trains(reference, tiny_bert):
    from lora_jax.data import get_task

    cfg = compose(f"model.name_or_path={tiny_bert}", "method=bitfit")
    model, _, lora = reference.build_model(cfg, get_task("mrpc"))
    trainable, total = reference.count_params(model)
    _, params, _, _ = from_pretrained(tiny_bert, task="sequence-classification", num_labels=2)
    mask = trainable_mask(params, lora, "bitfit")
    expected = sum(int(np.size(p)) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if m)
    assert trainable == expected and total == sum(int(np.size(p)) for p in jax.tree.leaves(params))
    assert 0 < trainable < total


def test_bad_input_gives_one_clear_line_and_exit_2(tiny_bert, tiny_glue, tmp_path):
    proc = launch("peft_reference.py", overrides(tiny_bert, tiny_glue, tmp_path, "task=mrcp"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: GLUE task 'mrcp' unknown"), err[-2000:]
    assert "Traceback" not in err
