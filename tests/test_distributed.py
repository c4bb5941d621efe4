"""distributed=true for real on one machine: two processes with two CPU devices each (JAX's CPU collectives over
gloo, a coordinator on 127.0.0.1) train the same LoRA run as one process with four devices, loss for loss."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_jax.logging import read_jsonl
from tests.conftest import save_tiny_bert, write_tiny_mrpc

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], devices: int) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    env.pop("LORA_JAX_DEBUG", None)
    return subprocess.Popen([sys.executable, str(ROOT / "experiments" / "run.py"), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
def test_two_processes_of_two_devices_train_as_one_process_of_four(tmp_path):
    tiny_bert = save_tiny_bert(tmp_path / "tiny_bert", dropout=0.1)
    glue = write_tiny_mrpc(tmp_path / "glue")
    common = [
        f"model.name_or_path={tiny_bert}", f"data.dir={glue}", "task=mrpc", "data.max_len=32", "optim.batch_size=8",
        "optim.epochs=2", "optim.lr=1e-2", "optim.log_every=1", "optim.save_every_steps=4", "lora.r=4",
        "lora.dropout=0.1", "progress=false", "compilation_cache=null",
    ]  # fmt: skip
    single = launch([*common, f"out_dir={tmp_path / 'single'}"], devices=4)
    out, err = single.communicate(timeout=1500)
    assert single.returncode == 0, err[-3000:]

    multi = tmp_path / "multi"
    cluster = [f"out_dir={multi}", "distributed=true", f"cluster.coordinator_address=127.0.0.1:{free_port()}",
               "cluster.num_processes=2"]  # fmt: skip
    procs = [launch([*common, *cluster, f"cluster.process_id={i}"], devices=2) for i in range(2)]
    results = [p.communicate(timeout=1500) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]

    multi_summary = (multi / "summary.json").read_text()
    assert '"devices": "4 x cpu"' in multi_summary
    one = [r["loss"] for r in read_jsonl(tmp_path / "single" / "train.jsonl")]
    two = [r["loss"] for r in read_jsonl(multi / "train.jsonl")]
    assert len(one) == 12
    np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)
    a = load_file(tmp_path / "single" / "adapter" / "adapter.safetensors")
    b = load_file(multi / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and any(".lora_b" in k for k in a)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-5, rtol=0, err_msg=key)
