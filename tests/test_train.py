"""The training loop in process on a tiny BERT: saves that coincide with the end, how often the loss is read back,
and the exports (native adapter, PEFT adapter, merged HF checkpoint) agreeing with each other."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lora_jax.logging import read_jsonl
from lora_jax.runbook import RunBook
from tests.conftest import save_tiny_bert, write_tiny_mrpc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), with_head=False, dropout=0.1)


@pytest.fixture(scope="module")
def tiny_glue(tmp_path_factory) -> Path:
    return write_tiny_mrpc(tmp_path_factory.mktemp("glue"))  # 48 train rows: 6 steps of 8 per epoch


def run_config(tiny_bert: Path, tiny_glue: Path, out_dir: Path, *extra: str):
    sys.path.insert(0, str(ROOT / "experiments"))
    import run  # noqa: F401  (the config schema)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=[
            f"model.name_or_path={tiny_bert}", f"data.dir={tiny_glue}", "task=mrpc", "data.max_len=32",
            "optim.batch_size=8", "optim.lr=1e-2", "lora.r=4", "progress=false", f"out_dir={out_dir}",
            "compilation_cache=null", *extra,
        ])  # fmt: skip


def test_max_steps_and_an_epoch_end_on_save_steps_finish_cleanly(tiny_bert, tiny_glue, tmp_path, monkeypatch):
    """Saves every 3 steps: step 6 ends epoch 0, step 9 is max_steps; the final save used to collide with the
    periodic one ("Checkpoint for step 9 already exists")."""
    from lora_jax.experiment import run

    reads = []
    original = RunBook.read_losses

    def counting(self, schedule, config):
        reads.append(len(self.pending))
        original(self, schedule, config)

    monkeypatch.setattr(RunBook, "read_losses", counting)
    out = tmp_path / "run"
    summary = run(run_config(tiny_bert, tiny_glue, out, "optim.epochs=3", "optim.max_steps=9",
                             "optim.save_every_steps=3", "optim.log_every=3"))  # fmt: skip
    assert summary["steps"] == 9 and [r["epoch"] for r in summary["history"]] == [0, 1]
    latest = [int(p.name) for p in (out / "checkpoints" / "latest").iterdir() if p.name.isdigit()]
    assert latest == [9]
    # The loss came back to the host 3 times (3 steps each), not 9; train.jsonl holds steps 3, 6, 9.
    assert reads == [3, 3, 3]
    assert [r["step"] for r in read_jsonl(out / "train.jsonl")] == [3, 6, 9]
    # Run again: it resumes at the end and finishes without training or saving again.
    again = run(run_config(tiny_bert, tiny_glue, out, "optim.epochs=3", "optim.max_steps=9",
                           "optim.save_every_steps=3", "optim.log_every=3"))  # fmt: skip
    assert again["history"] == summary["history"]


def test_exports_agree_with_the_adapter(tiny_bert, tiny_glue, tmp_path):
    from lora_jax.adapters import load_adapter
    from lora_jax.adapters_peft import load_peft_adapter
    from lora_jax.experiment import run
    from lora_jax.lora import strip_lora
    from lora_jax.models.hub import from_pretrained

    out = tmp_path / "run"
    summary = run(run_config(tiny_bert, tiny_glue, out, "optim.epochs=1", "exports=[adapter,peft,merged]"))
    assert summary["exports"] == {"adapter": "adapter", "peft": "peft", "merged": "merged"}
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    module, base, _, _ = from_pretrained(tiny_bert, task="sequence-classification", num_labels=2)
    merged_module, merged, _, _ = from_pretrained(out / "merged", task="sequence-classification", num_labels=2)
    ids = np.asarray([[101, 1996, 4937, 2938, 102, 0]])
    mask = (ids > 0).astype(np.int32)
    logits = lambda m, p: np.asarray(m.apply({"params": p}, ids, mask)["logits"])  # noqa: E731
    native, _ = load_adapter(out / "adapter", base)
    peft, _ = load_peft_adapter(out / "peft", strip_lora(base), "bert")
    np.testing.assert_allclose(logits(merged_module, merged), logits(module, native), atol=1e-5)
    np.testing.assert_allclose(logits(module, peft), logits(module, native), atol=1e-5)
    assert not np.allclose(logits(module, native), logits(module, base))  # the run trained something
    assert jax.process_count() == 1
