"""experiments/run.py end to end on a tiny random BERT and tiny GLUE files: results layout, devices, resume, NaN,
bad overrides."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from lora_jax.logging import read_jsonl
from tests.conftest import save_tiny_bert, write_tiny_mrpc

pytestmark = pytest.mark.slow  # run.py in subprocesses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), with_head=False, dropout=0.1)


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
        "optim.lr=1e-2",
        "optim.log_every=1",
        "optim.save_every_steps=2",
        "lora.r=4",
        "progress=false",
        *extra,
    ]


def run_py(args: list[str], devices: int = 1, **popen) -> subprocess.Popen:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    env.pop("LORA_JAX_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "experiments" / "run.py"), *args],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run_dir(results: Path) -> Path:
    return results / "default" / "mrpc" / "lora_r4_a8_seed0"


def latest_state(directory: Path) -> dict[str, np.ndarray]:
    latest = directory / "checkpoints" / "latest"
    step = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore((latest / str(step) / "state").resolve())
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}")
        elif node is not None:
            flat[prefix] = np.asarray(node)

    walk(state["trainable"], "")
    return flat


@pytest.fixture(scope="module")
def reference_run(tiny_bert, tiny_glue, tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("reference")
    code, out, err = finish(run_py(overrides(tiny_bert, tiny_glue, results)))
    assert code == 0, err[-3000:]
    return run_dir(results)


def test_run_writes_the_results_layout(reference_run):
    files = {p.name for p in reference_run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "train.jsonl", "summary.json", "checkpoints", "adapter"} <= files
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["task"] == "mrpc" and summary["main_metric"] == "accuracy"
    assert [r["epoch"] for r in summary["history"]] == [0, 1]
    assert summary["best"] == max(r["accuracy"] for r in summary["history"])
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["tokens_per_s"] > 0 and summary["git_commit"]
    metrics = read_jsonl(reference_run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [0, 1] and {"accuracy", "f1"} <= set(metrics[0])
    losses = [r["loss"] for r in read_jsonl(reference_run / "train.jsonl")]
    assert len(losses) == 12 and all(np.isfinite(losses))


def test_four_devices_give_the_same_losses(reference_run, tiny_bert, tiny_glue, tmp_path):
    code, _, err = finish(run_py(overrides(tiny_bert, tiny_glue, tmp_path), devices=4))
    assert code == 0, err[-3000:]
    four = [r["loss"] for r in read_jsonl(run_dir(tmp_path) / "train.jsonl")]
    one = [r["loss"] for r in read_jsonl(reference_run / "train.jsonl")]
    np.testing.assert_allclose(four, one, atol=1e-5, rtol=0)
    summary = json.loads((run_dir(tmp_path) / "summary.json").read_text())
    assert summary["devices"].startswith("4 x")


def test_kill_9_then_rerun_resumes_to_identical_params(reference_run, tiny_bert, tiny_glue, tmp_path):
    args = overrides(tiny_bert, tiny_glue, tmp_path)
    proc = run_py(args)
    latest = run_dir(tmp_path) / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in latest.iterdir() if p.name.isdigit()] if latest.exists() else []
        if steps and max(steps) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    assert 4 <= killed_at < 12

    code, out, err = finish(run_py(args))
    assert code == 0, err[-3000:]
    assert f"resuming {run_dir(tmp_path)}" in out + err
    resumed, reference = latest_state(run_dir(tmp_path)), latest_state(reference_run)
    assert resumed.keys() == reference.keys() and resumed
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)
    losses = [r["loss"] for r in read_jsonl(run_dir(tmp_path) / "train.jsonl")]
    assert losses == [r["loss"] for r in read_jsonl(reference_run / "train.jsonl")]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    tiny_bert, tiny_glue, tmp_path
):
    args = overrides(
        tiny_bert, tiny_glue, tmp_path, "optim.lr=1e30", "optim.save_every_steps=1", "optim.warmup_ratio=0"
    )
    code, _, err = finish(run_py(args))
    assert code == 2
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: loss became nan") and "last good checkpoint" in message
    latest = run_dir(tmp_path) / "checkpoints" / "latest"
    saved = [int(p.name) for p in latest.iterdir() if p.name.isdigit()]
    assert saved, "no checkpoint kept"
    assert all(np.isfinite(v).all() for v in latest_state(run_dir(tmp_path)).values())


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["task=mrcp"], "error: Task 'mrcp' unknown; choose one of cola, sst2, mrpc"),
        (["lora.r=0"], "error: LoRA r must be a positive integer, got 0"),
        (["data.dir=/nonexistent"], "error: No GLUE data for MRPC split 'train' under /nonexistent"),
        (["optim.lr=-1"], "error: optim.lr must be > 0, got -1"),
    ],
)
def test_bad_overrides_give_one_clear_line(extra, expected, tiny_bert, tiny_glue, tmp_path):
    code, _, err = finish(run_py(overrides(tiny_bert, tiny_glue, tmp_path, *extra)), timeout=120)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(expected), err[-2000:]
    assert "Traceback" not in err


def test_packed_launcher_runs_a_sweep_as_one_program_with_the_separate_runs_folders(reference_run, tiny_bert,
                                                                                     tiny_glue, tmp_path):  # fmt: skip
    """`-m hydra/launcher=packed seed=0,1 lora.r=2,4`: four runs in one process, one folder each, named as the
    basic launcher names them; with `exact_dropout` the (seed 0, r 4) one equals the reference run made alone
    (dropout on: each run draws a separate run's masks)."""
    args = ["-m", *overrides(tiny_bert, tiny_glue, tmp_path), "hydra/launcher=packed", "seed=0,1", "lora.r=2,4",
            "hydra.launcher.exact_dropout=true"]  # fmt: skip
    code, out, err = finish(run_py(args))
    assert code == 0, err[-3000:]
    sweep = tmp_path / "default" / "mrpc"
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert names == ["lora_r2_a8_seed0", "lora_r2_a8_seed1", "lora_r4_a8_seed0", "lora_r4_a8_seed1"]
    layout = {"config.yaml", "metrics.jsonl", "train.jsonl", "summary.json", "checkpoints", "adapter", ".hydra"}
    for name in names:
        assert layout <= {p.name for p in (sweep / name).iterdir()}
        assert len(json.loads((sweep / name / "summary.json").read_text())["packed_with"]) == 4
    ours, theirs = sweep / "lora_r4_a8_seed0", reference_run
    for key, value in latest_state(theirs).items():  # 1% of an Adam step at lr 1e-2: see test_sweep.weight_atol
        np.testing.assert_allclose(latest_state(ours)[key], value, atol=1e-4, rtol=0, err_msg=key)
    losses = lambda d: [r["loss"] for r in read_jsonl(d / "train.jsonl")]  # noqa: E731
    np.testing.assert_allclose(losses(ours), losses(theirs), atol=1e-5, rtol=0)
    assert "Packing 4 jobs into one program" in out + err
