"""benchmarks/: the hand-counted FLOP formula against the matmuls lora_jax's real training step asks for, and
the report's target checks."""

from __future__ import annotations

import importlib.util
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import flops, report
from benchmarks.common import random_batch
from lora_jax import objective
from lora_jax import train as lj_train
from lora_jax.lora import lora_wrap
from lora_jax.methods import partition, trainable_mask
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
    trainable, frozen = partition(params, trainable_mask(params, lcfg, method))
    tx = objective.make_optimizer(lj_train.TrainConfig(method=method), 10)
    step, _ = lj_train.make_steps(module, tx, shape.num_labels, seed=0)
    state = lj_train.TrainState(trainable, tx.init(trainable), jnp.int32(0))
    return jax.make_jaxpr(step)(state, frozen, data)


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


def test_each_matmul_rebuilds_as_the_step_ran_it():
    """The timing of the step's matmuls alone rebuilds each dot_general from its inventory entry: the rebuilt
    product must have the step's operands, output size and FLOPs, or the 'time alone' would time something else."""
    closed = _step_jaxpr(flops.Shape(hidden=32, layers=2, heads=4, ffn=64, vocab=50, max_positions=24), 2, 8,
                         "lora", 4)  # fmt: skip
    matmuls = flops.jaxpr_matmuls(closed)
    assert sum(matmuls.values()) > len(matmuls) > 5  # repeats across layers collapse into counts
    for m in matmuls:
        a, b = jax.ShapeDtypeStruct(m.lhs_shape, m.dtype), jax.ShapeDtypeStruct(m.rhs_shape, m.dtype)
        out = jax.eval_shape(lambda x, y, dims=m.dimension_numbers: jax.lax.dot_general(x, y, dims), a, b)
        contracted = 1
        for axis in m.dimension_numbers[0][0]:
            contracted *= m.lhs_shape[axis]
        assert 2.0 * out.size * contracted == m.flops
    assert sum(m.flops * c for m, c in matmuls.items()) == flops.jaxpr_matmul_flops(closed)


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


def test_matmul_ceiling_is_floor_time_over_the_matmuls_time():
    # 2 GFLOP at a 10 GFLOP/s peak: a 0.2 s floor; its matmuls alone take 0.25 s, so 0.8 is the most it can reach.
    alone = {"sum_median_s": 0.25, "gflops": 8.0, "dots": 3, "distinct": 2}
    results = {
        "meta": {"gpu": False, "peak_tflops": None},
        "flops": {"lora": {"total": 2.0e9}, "full": {"total": 3.0e9}},
        "peak": {"jax": {"gflops_best": 10.0, "gflops_median": 8.0}},
        "train": {"lora_jax/lora": {"median_s": 0.5, "matmuls_alone": alone}, "lora_jax/full": {"median_s": 1.0}},
    }
    assert report.matmul_ceiling(results, "lora_jax/lora") == pytest.approx(0.8)
    assert report.matmul_ceiling(results, "lora_jax/full") is None  # not measured: no bound claimed
    split = "\n".join(report._time_split(results))
    assert "| lora_jax/lora | 500.0 | 3 (2 distinct) | 250.0 | 8.0 | 0.50 | 250.0 | 0.80 |" in split


@pytest.mark.slow  # one process per configuration
def test_bank_benchmark_quick_runs_every_configuration(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "benchmarks/bank.py", "--quick", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("bank-*.json")
    configs = json.loads(result.read_text())["configs"]
    expected = {"tiny/train/packed-2", "tiny/train/sequential-2", "tiny/serve/merged-1"} | {
        f"tiny/serve/{mode}-{n}" for mode in ("routed", "merge-per-request", "peft") for n in (1, 2)
    }
    assert set(configs) == expected
    failed = {name: r["error"][-500:] for name, r in configs.items() if "error" in r}
    assert not failed, failed
    assert all(r["median_s"] > 0 for r in configs.values())
    assert configs["tiny/serve/routed-2"]["tokens_per_s"] > 0
    assert "x the throughput of tiny/train/sequential-2" in next(tmp_path.glob("bank-*.md")).read_text()


def test_table1_latency_quick_run_writes_every_variant(tmp_path):
    """benchmarks/table1_latency.py --quick: all five variants timed in one run, the adapters' r chosen from the
    parameter budget by the paper's formula, the JSON and the markdown table written (timings are not checked)."""
    from benchmarks import table1_latency
    from lora_jax.bottleneck import paper_adapter_count

    run = table1_latency.main(["--quick", "--out", str(tmp_path)])
    d, layers = table1_latency.TINY["n_embd"], table1_latency.TINY["n_layer"]

    def count(r: int, method: str) -> int:  # AdapterL: one adapter and one LayerNorm a layer; AdapterH: two adapters
        if method == "adapter_l":
            return paper_adapter_count(layers, d, r, layers)
        return paper_adapter_count(2 * layers, d, r)

    assert [(s["batch"], s["seq"]) for s in run["settings"]] == [(2, 16), (1, 8)]
    for setting in run["settings"]:
        assert set(setting["variants"]) == set(table1_latency.VARIANTS)
        assert setting["variants"]["base"]["ratio_to_base"] == 1.0
        assert all(v["ms_median"] > 0 and len(v["round_medians_ms"]) == 2 for v in setting["variants"].values())
        for method, r in setting["adapter_r"].items():
            assert all(abs(count(r, method) - 2e4) <= abs(count(q, method) - 2e4) for q in range(1, d + 1))
    assert len(list(tmp_path.glob("table1_latency-*.json"))) == 1
    rows = [line for line in (tmp_path / "table1_latency.md").read_text().splitlines() if line.startswith("| 2 x 16")]
    assert len(rows) == 5


def test_table1_keeps_each_settings_newest_run(tmp_path):
    """Re-timing one setting replaces that setting's rows only; the table names the JSON each setting came from,
    and a run on another device never fills a row."""
    from benchmarks import table1_latency

    first = table1_latency.main(["--quick", "--out", str(tmp_path)])
    alien = json.loads((tmp_path / first["json"].rsplit("/", 1)[-1]).read_text())
    alien |= {"device": "1 x TPU v9", "json": "alien.json", "settings": [dict(alien["settings"][0], batch=3)]}
    (tmp_path / "table1_latency-00000000-000000.json").write_text(json.dumps(alien))
    second = table1_latency.main(["--quick", "--settings", "1x8", "--out", str(tmp_path)])
    text = (tmp_path / "table1_latency.md").read_text()
    rows = [line.split(" | ")[0] for line in text.splitlines() if line[:3] in ("| 1", "| 2", "| 3")]
    assert rows == ["| 2 x 16"] * 5 + ["| 1 x 8"] * 5
    assert "- 2 x 16: 3 forwards x 2 rounds" in text and first["json"] in text
    assert "- 1 x 8: 3 forwards x 2 rounds" in text and second["json"] in text
    assert "alien" not in text and "3 x 16" not in text


# ---------------------------------------------------------------------------------------------------------------
# benchmarks/quant.py: every framework trains the same model on the same batch
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory):
    pytest.importorskip("torch")
    from benchmarks.quant import tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_checkpoint(folder)
    return folder


def _quant_run(config: str, folder) -> dict:
    from benchmarks.quant import CONFIGS, TINY, QuantSpec

    spec = QuantSpec(config, str(folder), TINY["vocab_size"], batch=2, seq=16, rank=4, warmup=1, steps=1)
    if CONFIGS[config][0] == "quant_torch":
        from benchmarks import quant_torch as worker
    else:
        from benchmarks import quant_jax as worker
    return worker.train(spec)


@pytest.mark.slow  # ~2 min on the loaded 2-core machine (torch, and two Qwix compiles)
def test_quant_benchmark_lora_jax_qwix_and_peft_start_from_the_same_loss(tiny_llama_folder):
    """Same checkpoint, batch and LoRA placement (B = 0 at the start): the first losses agree across frameworks,
    and so do the trainable counts, so the timings compare like with like."""
    configs = ["lora_jax/fp32", "peft/fp32"] + (["qwix/lora-fp32"] if importlib.util.find_spec("qwix") else [])
    runs = {c: _quant_run(c, tiny_llama_folder) for c in configs}
    first = {c: r["losses"][0] for c, r in runs.items()}
    assert all(r["losses_finite"] and r["median_s"] > 0 for r in runs.values())
    assert max(first.values()) - min(first.values()) < 1e-5, first
    assert len({r["trainable_params"] for r in runs.values()}) == 1
    # 2 layers, r = 4: q and o 64 -> 64, k and v 64 -> 32 (2 KV heads of 16), gate, up and down 64 <-> 128
    assert runs["lora_jax/fp32"]["trainable_params"] == 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))


@pytest.mark.slow
def test_quant_benchmark_nf4_bases_and_the_report(tiny_llama_folder, tmp_path):
    """lora_jax's NF4 is bitsandbytes' (double quantization included): the same first loss over an nf4 base;
    the driver writes its JSON and table with every configuration measured."""
    from benchmarks import quant
    from benchmarks.report_quant import ratios

    lj, bnb = (_quant_run(c, tiny_llama_folder) for c in ("lora_jax/nf4", "peft/bnb-nf4"))
    assert lj["lora_jax_quantized_kernels"] == 2 * 7 and bnb["bnb_4bit_layers"] == 2 * 7
    assert abs(lj["losses"][0] - bnb["losses"][0]) < 1e-5
    configs = ["lora_jax/fp32", "lora_jax/gguf-q4_1", "lora_jax/nf4+table"]
    configs += ["qwix/qlora-nf4"] if importlib.util.find_spec("qwix") else []
    report = quant.main(["--quick", "--configs", *configs, "--out", str(tmp_path)])
    assert all("median_s" in report["results"][c] for c in configs), report["results"]
    base = {c: report["results"][c]["frozen_base_mb"] for c in configs}
    assert base["lora_jax/nf4+table"] < base["lora_jax/gguf-q4_1"] < base["lora_jax/fp32"]  # the table: fp32 in q4_1
    table = next(tmp_path.glob("quant-*-quick.md")).read_text()
    assert all(f"| {c} | " in table for c in configs)
    verdicts = {r["target"]: r["pass"] for r in ratios(report["results"])}
    assert verdicts["PEFT+torch fp32 step / lora_jax fp32 step"] is None  # no PEFT row: no verdict, not a pass
