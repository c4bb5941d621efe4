"""experiments/baseline_reading.py on fake run folders: each tuned baseline beside LoRA q,v per task, the claim's
verdict, the seeds' interval, and what is provisional or left out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import lr_selection  # noqa: E402
from baseline_reading import baseline_reading  # noqa: E402

from tests.test_lr_selection import fake_point  # noqa: E402


@pytest.fixture(autouse=True)
def four_epoch_protocol(monkeypatch):
    monkeypatch.setattr(lr_selection, "EPOCHS", 4)


def seeds(results: Path, method: str, lr: float, bests: list[float], trainable: int) -> None:
    for seed, best in enumerate(bests):
        fake_point(results, "mrpc", method, lr, [0.6, best], seed=seed, trainable=trainable)


def test_the_claim_is_read_per_baseline_with_its_seeds_interval(tmp_path):
    for lr in (5e-4, 1e-3, 2e-3, 4e-3):
        fake_point(tmp_path, "mrpc", "lora", lr, [0.6, 0.80 if lr == 1e-3 else 0.7], trainable=222_338)
    fake_point(tmp_path, "mrpc", "lora", 1e-3, [0.6, 0.801], seed=1, trainable=222_338)
    fake_point(tmp_path, "mrpc", "lora", 1e-3, [0.6, 0.799], seed=2, trainable=222_338)
    for lr in (1e-3, 4e-3):  # Adapter^H: grid run, best at 2e-3, 3 seeds 3 points above LoRA with little spread
        fake_point(tmp_path, "mrpc", "adapter_h", lr, [0.6, 0.7], trainable=237_026)
    seeds(tmp_path, "adapter_h", 2e-3, [0.83, 0.831, 0.829], 237_026)
    for lr in (1e-3, 2e-3):  # Adapter^L: best at the top rate tried, one seed: provisional, LoRA ahead
        fake_point(tmp_path, "mrpc", "adapter_l", lr, [0.6, 0.70], trainable=229_346)
    fake_point(tmp_path, "mrpc", "adapter_l", 4e-3, [0.6, 0.75], trainable=229_346)
    fake_point(tmp_path, "mrpc", "bitfit", 4e-3, [0.6, 0.9], trainable=174_338)  # one rate: not tuned, left out
    prefix = {"prefix": {"l_p": 32, "l_i": 0}, "data": {"max_len": 160}}
    for lr, best in ((1e-3, 0.70), (2e-3, 0.79)):  # PreLayer: tuned, best at the top rate; and a run with cut text
        fake_point(tmp_path, "mrpc", "prefix_layer", lr, [0.6, best], trainable=222_338, extra=prefix)
    cut = {**prefix, "data": {"max_len": 128}}
    fake_point(tmp_path, "mrpc", "prefix_layer", 2e-3, [0.6, 0.9], extra=cut, name="cut", trainable=222_338)
    lines = baseline_reading(tmp_path)
    (mrpc,) = [line for line in lines if line.startswith("- MRPC")]
    assert mrpc.startswith("- MRPC: LoRA q,v 80.0 (n=3 79.9–80.1, 222,338 trainable) against ")
    assert "Adapter^H 83.0 (n=3 82.9–83.1, 237,026 trainable): LoRA -3.0, 12 dev rows (95% CI" in mrpc
    assert "the seeds show LoRA behind by more than 1)" in mrpc
    assert "Adapter^L 75.0 (n=1, 229,346 trainable): LoRA +5.0, 20 dev rows (1 seed(s), not 3; grid unfinished)" in mrpc
    assert "BitFit" not in mrpc
    assert "PreLayer l_p=32 l_i=0 79.0 (n=1, 222,338 trainable): LoRA +1.0" in mrpc and "90.0" not in mrpc
    claim = lines[-1]
    assert "holds against MRPC Adapter^L*, MRPC PreLayer l_p=32 l_i=0* and fails against MRPC Adapter^H; *" in claim
    assert "settle MRPC Adapter^H (behind)" in claim


def test_nothing_to_read_without_lora_or_a_tuned_baseline(tmp_path):
    assert baseline_reading(tmp_path) == []
    fake_point(tmp_path, "mrpc", "adapter_h", 1e-3, [0.6, 0.8])
    fake_point(tmp_path, "mrpc", "adapter_h", 2e-3, [0.6, 0.7])
    assert baseline_reading(tmp_path) == []  # no LoRA runs to compare with
