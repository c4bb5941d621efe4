"""benchmarks/: the hand-counted FLOP formula against the matmuls lora_jax's real training step asks for, and
the report's target checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks import flops, report
from benchmarks.common import random_batch
from lora_jax import train as lj_train
from lora_jax.lora import lora_wrap, partition
from lora_jax.models import bert, hub


def _step_jaxpr(shape: flops.Shape, batch: int, seq: int, method: str, rank: int):
    config = bert.Config(
        model_type="roberta",
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.ffn,
        max_position_embeddings=shape.max_positions,
        type_vocab_size=1,
        pad_token_id=1,
        num_labels=shape.num_labels,
    )
    module = bert.build(config, "sequence-classification")
    data = {k: jnp.asarray(v) for k, v in random_batch(shape, batch, seq).items()}
    params = module.init(jax.random.key(0), data["input_ids"])["params"]
    lcfg = None
    if method == "lora":
        lcfg = hub.lora_config("roberta", flops.LORA_MODULES, r=rank, alpha=rank, train_also=("classifier",))
        params = lora_wrap(params, lcfg, jax.random.key(1))
    trainable, frozen = partition(params, lj_train.method_mask(params, method, lcfg))
    tx = lj_train.make_optimizer(lj_train.TrainConfig(method=method), 10)
    step, _ = lj_train.make_steps(module, tx, shape.num_labels, seed=0)
    return jax.make_jaxpr(step)(trainable, tx.init(trainable), frozen, data, jnp.int32(0))


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize(
    "shape,batch,seq,rank",
    [
        (flops.Shape(hidden=32, layers=3, heads=4, ffn=64, vocab=50, max_positions=24), 2, 8, 4),
        (flops.Shape(hidden=16, layers=1, heads=2, ffn=48, vocab=30, max_positions=24, num_labels=3), 3, 16, 2),
    ],
)
def test_analytic_flops_equal_the_steps_matmuls(shape, batch, seq, rank, method):
    want = flops.train_step_flops(shape, batch, seq, method, rank)
    got = flops.jaxpr_matmul_flops(_step_jaxpr(shape, batch, seq, method, rank))
    assert got == pytest.approx(want["total"], rel=1e-12)
    assert want["forward"] + want["backward"] == want["total"]


def test_lora_skips_frozen_weight_gradients():
    shape = flops.SHAPES["base"]
    lora, full = (flops.train_step_flops(shape, 8, 128, m) for m in ("lora", "full"))
    # What LoRA saves is the frozen dW plus layer 0's input gradients, less what its adapters add.
    adapters_fwd = flops.forward_flops(shape, 8, 128, lora_rank=8)["lora"]
    adapters_bwd = shape.layers * len(flops.LORA_MODULES) * 8 * 8 * 128 * shape.hidden * 8
    saved = lora["skipped_weight_grads"] + lora["skipped_layer0_input_grads"]
    assert full["total"] - lora["total"] == saved - adapters_fwd - adapters_bwd
    assert 0.6 < lora["total"] / full["total"] < 0.7  # the ~2/3 the docstring promises at RoBERTa's shapes


def test_target_checks():
    assert report._check("lora_vs_peft_eager", 1.2)["pass"] is True
    assert report._check("lora_vs_peft_eager", 1.0)["pass"] is False
    assert report._check("lora_over_full_time", 0.71)["pass"] is False
    assert report._check("merged_over_base", 0.985)["pass"] is True
    assert report._check("merged_over_base", 1.03)["pass"] is False
    assert report._check("lora_over_full_memory", None)["pass"] is None


def test_each_config_is_charged_its_own_methods_flops():
    """lora_jax/full must be charged full FT's FLOPs although its name contains "lora"."""
    results = {
        "meta": {"gpu": False, "peak_tflops": None},
        "flops": {"lora": {"total": 2.0e9}, "full": {"total": 3.0e9}},
        "peak": {"jax": {"gflops_best": 10.0, "gflops_median": 8.0}},
        "train": {name: {"median_s": 1.0} for name in
                  ("lora_jax/lora", "lora_jax/full", "lora_jax/lora-remat", "peft/eager", "torch/full-eager")},
    }  # fmt: skip
    report.enrich(results)
    charged = {name: r["achieved_flops_per_s"] for name, r in results["train"].items()}
    assert charged == {
        "lora_jax/lora": 2.0e9, "lora_jax/full": 3.0e9, "lora_jax/lora-remat": 2.0e9, "peft/eager": 2.0e9,
        "torch/full-eager": 3.0e9,
    }  # fmt: skip
    assert results["train"]["lora_jax/full"]["fraction_of_measured_peak"] == pytest.approx(0.3)
    assert results["train"]["lora_jax/full"]["fraction_of_median_peak"] == pytest.approx(3.0 / 8.0)
