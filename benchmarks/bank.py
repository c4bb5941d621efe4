"""Many adapters on one base: packed training of K LoRA runs against K sequential runs, and mixed-batch serving
against PEFT's mixed batches and against merging each request's adapter.

    python benchmarks/bank.py                      # MiniLM-L6 and RoBERTa-base shapes, random weights, CPU or GPU
    python benchmarks/bank.py --shape base --ks 4,8 --batch 16
    python benchmarks/bank.py --quick              # a tiny shape: checks the suite runs, measures nothing

Training: K = 4 and 8 runs (seeds and learning rates differ; LoRA r=8 on W_q, W_v plus the head), batch x seq
each. `packed` is lora_jax.sweep's one jitted step for all K; `sequential` is one run's train.py step (K
sequential runs take K of them per step of all K, and hold one run's memory at a time). Serving: a batch of
`--serve-batch` rows x seq, rows spread over 1, 4 and 16 distinct adapters of a 16-adapter bank:
`routed` (bank.mixed_apply, one program), `merge-per-request` (merge each adapter into the base, run its rows,
the classic way to serve LoRA without a bank), `peft` (torch, `model(..., adapter_names=[...])`), and
`merged` (one adapter merged, the whole batch: the latency floor the targets compare with).

Every configuration runs in its own process (peak memory of one never mixes with another's). Writes
benchmarks/results/bank-<date>.{json,md} (--quick: results/raw/). Nothing else may run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info  # noqa: E402

# name: (transformers config class, fields); minilm is all-MiniLM-L6-v2's shape (BERT, 6 x 384)
SHAPES = {
    "tiny": ("BertConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=1000)),  # fmt: skip
    "minilm": ("BertConfig", dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536, vocab_size=30522)),  # fmt: skip
    "base": ("RobertaConfig", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                   intermediate_size=3072, vocab_size=50265)),  # fmt: skip
}
TARGETS = ("query", "value")
RANK = 8
BANK_SIZE = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="minilm,base", help="comma separated: minilm, base (tiny with --quick)")
    p.add_argument("--ks", default="4,8", help="packed sweep sizes")
    p.add_argument("--batch", type=int, default=16, help="rows per run per training step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--serve-batch", type=int, default=32)
    p.add_argument("--serve-adapters", default="1,4,16", help="distinct adapters in a serving batch")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--quick", action="store_true", help="tiny shape, K=2, few steps: a smoke test")
    p.add_argument("--steps", type=int, default=10, help="timed steps (calls) per configuration; median reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator warm-up)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Workers (one configuration per process): python benchmarks/bank.py --worker SPEC_JSON OUT_JSON
# ---------------------------------------------------------------------------------------------------------------


def _jax_model(spec: dict[str, Any]):
    import jax.numpy as jnp

    from lora_jax.models import hub

    dtype = jnp.bfloat16 if spec["gpu"] else jnp.float32
    overrides = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    module, params, _, config = hub.from_pretrained(spec["checkpoint"], task="sequence-classification",
                                                   num_labels=2, dtype=dtype, **overrides)  # fmt: skip
    return module, params, config


def _batch(spec: dict[str, Any], rows: int, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(5, spec["vocab"], (rows, spec["seq"])).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": rng.integers(0, 2, rows).astype(np.int32),
            "weights": np.ones(rows, np.float32)}  # fmt: skip


def _adapters(params: Any, config: Any, n: int) -> list[Any]:
    """n LoRA-wrapped copies with trained-looking (non-zero) B, each from its own seed."""
    import jax

    from lora_jax.lora import lora_wrap
    from lora_jax.models import hub

    lcfg = hub.lora_config(config.model_type, ("q", "v"), r=RANK, alpha=RANK, train_also=("classifier",))
    out = []
    for i in range(n):
        wrapped = lora_wrap(params, lcfg, jax.random.key(i))
        key = jax.random.key(1000 + i)
        out.append(jax.tree_util.tree_map_with_path(
            lambda p, x, key=key: 0.02 * jax.random.normal(key, x.shape, x.dtype)
            if str(getattr(p[-1], "key", "")).startswith("lora_b") else x, wrapped))  # fmt: skip
    return out, lcfg


def _timed(fn, spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.common import peak_rss_mb, reset_peak_rss, time_calls

    for _ in range(spec["warmup"]):
        fn()
    reset_ok = reset_peak_rss()
    timing = time_calls(fn, 1, spec["steps"])
    return {**timing, "peak_rss_mb": peak_rss_mb() if reset_ok else None, "device_peak_bytes": _device_peak()}


def _device_peak() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lora_jax import objective, sweep
    from lora_jax import train as lj_train
    from lora_jax.methods import partition, trainable_mask
    from lora_jax.sharding import make_mesh

    module, params, config = _jax_model(spec)
    k = spec["k"] if spec["mode"] == "packed" else 1
    wrapped, lcfg = _adapters(params, config, k)
    del params
    train_config = lj_train.TrainConfig(batch_size=spec["batch"], progress=False)
    if spec["mode"] == "sequential":  # one run's own step, as train() jits it
        prepared = lj_train.prepare(module, wrapped[0], train_config, 2, 10_000, make_mesh(), lcfg)
        state, frozen = {"s": prepared.state}, prepared.frozen
        batch = jax.device_put(_batch(spec, spec["batch"]))

        def one() -> None:
            state["s"], loss = prepared.train_step(state["s"], frozen, batch)
            loss.block_until_ready()
    else:
        halves = [partition(w, trainable_mask(w, lcfg)) for w in wrapped]
        owns, shared = sweep._split_frozen([f for _, f in halves], [str(i) for i in range(k)])
        tx = objective.make_optimizer(lj_train.TrainConfig(lr=1.0), 10_000)
        trainable, mask = sweep.stack_padded([t for t, _ in halves])
        opt_state, _ = sweep.stack_padded([tx.init(t) for t, _ in halves])
        own, _ = sweep.stack_padded(owns)
        del halves, wrapped
        step = jax.jit(sweep.packed_train_step(module, tx, 2), donate_argnums=(0,))
        state = {"s": lj_train.TrainState(trainable, opt_state, jnp.int32(0))}
        batches = [_batch(spec, spec["batch"], seed=i) for i in range(k)]
        batch = jax.device_put({key: np.stack([b[key] for b in batches]) for key in batches[0]})
        seeds, lrs = jnp.arange(k, dtype=jnp.uint32), jnp.linspace(5e-4, 2e-3, k)

        def one() -> None:
            state["s"], losses = step(state["s"], own, shared, batch, seeds, lrs, mask)
            losses.block_until_ready()

    result = _timed(one, spec)
    result["all_k_step_s"] = result["median_s"] * (spec["k"] if spec["mode"] == "sequential" else 1)
    return result


def serve_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from lora_jax import bank as lb
    from lora_jax.lora import lora_params, merge, strip_lora
    from lora_jax.tree import combine

    module, params, config = _jax_model(spec)
    wrapped, _ = _adapters(params, config, BANK_SIZE)
    bank = lb.new_bank(params, capacity=BANK_SIZE, r_max=RANK)
    for i, w in enumerate(wrapped):
        bank = lb.add(bank, str(i), lora_params(w))
    del wrapped
    batch = _batch(spec, spec["serve_batch"])
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    rows = jnp.arange(spec["serve_batch"]) % spec["adapters"]
    apply = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m)["logits"])
    mode = spec["mode"]
    if mode == "routed":
        routed = jax.jit(lambda base, stack, r, i, m: lb.mixed_apply(apply, base, stack, r, i, m))
        fn = lambda: routed(bank.base, bank.stack, rows, ids, mask).block_until_ready()  # noqa: E731
    elif mode == "merged":
        merged = jax.jit(merge)(combine(bank.base, lb.adapter(bank, "0")))
        fn = lambda: apply(merged, ids, mask).block_until_ready()  # noqa: E731
    else:  # merge-per-request: each adapter merged into the base for its own rows, one after another
        merge_one = jax.jit(lambda base, adapter: strip_lora(merge(combine(base, adapter))))
        groups = [(str(a), jnp.flatnonzero(rows == a)) for a in range(spec["adapters"])]
        adapters = {name: lb.adapter(bank, name) for name, _ in groups}

        def fn() -> None:
            for name, where in groups:
                apply(merge_one(bank.base, adapters[name]), ids[where], mask[where]).block_until_ready()

    result = _timed(fn, spec)
    result["tokens_per_s"] = spec["serve_batch"] * spec["seq"] / result["median_s"]
    return result


def peft_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    from benchmarks.common import peak_rss_mb, reset_peak_rss, time_calls

    device = torch.device("cuda" if spec["gpu"] else "cpu")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(spec["checkpoint"], num_labels=2)
    torch.manual_seed(0)
    lcfg = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(TARGETS), init_lora_weights=False)
    model = peft.get_peft_model(base, lcfg, adapter_name="0")
    for i in range(1, BANK_SIZE):
        model.add_adapter(str(i), lcfg)
    model = model.to(device).eval()
    if spec["gpu"]:
        model = model.to(torch.bfloat16)
    batch = _batch(spec, spec["serve_batch"])
    ids = torch.tensor(batch["input_ids"], device=device)
    mask = torch.tensor(batch["attention_mask"], device=device)
    names = [str(i % spec["adapters"]) for i in range(spec["serve_batch"])]

    def fn() -> None:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, adapter_names=names)
        if spec["gpu"]:
            torch.cuda.synchronize()

    for _ in range(spec["warmup"]):
        fn()
    reset_ok = reset_peak_rss()
    result = time_calls(fn, 1, spec["steps"])
    result["peak_rss_mb"] = peak_rss_mb() if reset_ok else None
    result["tokens_per_s"] = spec["serve_batch"] * spec["seq"] / result["median_s"]
    return result


WORKERS = {"train": train_worker, "serve": serve_worker, "peft": peft_worker}


# ---------------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------------


def make_checkpoint(shape: str, folder: Path) -> None:
    """A random-initialised sequence classifier of the shape, saved once; every worker loads these weights."""
    import torch
    import transformers

    cls_name, fields = SHAPES[shape]
    torch.manual_seed(0)
    config = getattr(transformers, cls_name)(**fields, max_position_embeddings=514, num_labels=2)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)


def run_one(spec: dict[str, Any], log_dir: Path, timeout: float) -> dict[str, Any]:
    name = spec["name"].replace("/", "_")
    out, log = log_dir / f"{name}.json", log_dir / f"{name}.log"
    print(f"  {spec['name']:<40}", end="", flush=True)
    tick = time.perf_counter()
    env = {**os.environ, **({"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""} if not spec["gpu"] else {})}
    with open(log, "w") as f:
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec), str(out)], stdout=f,
                                  stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=ROOT)  # fmt: skip
            ok = proc.returncode == 0 and out.exists()
        except subprocess.TimeoutExpired:
            ok = False
    result = json.loads(out.read_text()) if ok else {"error": log.read_text()[-2000:]}
    print(f"{'ok' if ok else 'FAILED'} ({time.perf_counter() - tick:.0f} s)")
    return result


def table(results: dict[str, Any]) -> str:
    lines = ["| config | median s | all-K step s | tokens/s | peak RSS MB | device peak MB |", "|---" * 6 + "|"]
    for name, r in results["configs"].items():
        if "error" in r:
            lines.append(f"| {name} | failed | | | | |")
            continue
        fmt = lambda v, f: "" if v is None else f.format(v)  # noqa: E731
        device = r.get("device_peak_bytes")
        lines.append(f"| {name} | {r['median_s']:.4f} | {fmt(r.get('all_k_step_s'), '{:.4f}')} | "
                     f"{fmt(r.get('tokens_per_s'), '{:.0f}')} | {fmt(r.get('peak_rss_mb'), '{:.0f}')} | "
                     f"{fmt(device and device / 2**20, '{:.0f}')} |")  # fmt: skip
    for line in ratios(results["configs"]):
        lines.append(f"\n{line}")
    return "\n".join(lines) + "\n"


def ratios(configs: dict[str, Any]) -> list[str]:
    """The issue's targets: packed >= 1.15x sequential throughput; 16 routed adapters within 1.5x of merged."""
    out = []
    get = lambda name, key: configs.get(name, {}).get(key)  # noqa: E731
    for name in configs:
        if "/train/packed-" in name:
            seq_name = name.replace("packed-", "sequential-")
            packed, seq = get(name, "all_k_step_s"), get(seq_name, "all_k_step_s")
            if packed and seq:
                out.append(f"{name}: {seq / packed:.2f}x the throughput of {seq_name} (target >= 1.15x)")
        if "/serve/routed-" in name:
            merged = get(name.rsplit("/", 1)[0] + "/merged-1", "median_s")
            if merged and get(name, "median_s"):
                ratio = get(name, "median_s") / merged
                out.append(f"{name}: {ratio:.2f}x the merged adapter's latency (16 adapters: target <= 1.5x)")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    print(f"RULE: nothing else may run on this machine while it measures. 1-minute load: {os.getloadavg()[0]:.2f}")
    if args.device == "auto":
        import torch

        gpu = torch.cuda.is_available()
    else:
        gpu = args.device == "gpu"
    shapes = ["tiny"] if args.quick else args.shape.split(",")
    ks = [2] if args.quick else [int(k) for k in args.ks.split(",")]
    seq, batch = (16, 4) if args.quick else (args.seq, args.batch)
    serve_batch = 4 if args.quick else args.serve_batch
    served = [1, 2] if args.quick else [int(n) for n in args.serve_adapters.split(",")]
    common = dict(gpu=gpu, seq=seq, batch=batch, serve_batch=serve_batch, warmup=1 if args.quick else args.warmup,
                  steps=2 if args.quick else args.steps)  # fmt: skip
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    out_dir = args.out or (ROOT / "benchmarks" / "results" / ("raw" if args.quick else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"meta": {**common, "shapes": shapes, "ks": ks, "served": served, "date": stamp,
                                        "machine": machine_info(), "quick": args.quick}, "configs": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for shape in shapes:
            checkpoint = tmp / shape
            make_checkpoint(shape, checkpoint)
            base = {**common, "checkpoint": str(checkpoint), "vocab": SHAPES[shape][1]["vocab_size"]}
            specs = []
            for k in ks:
                specs.append({**base, "kind": "train", "mode": "packed", "k": k, "name": f"{shape}/train/packed-{k}"})
                specs.append({**base, "kind": "train", "mode": "sequential", "k": k,
                              "name": f"{shape}/train/sequential-{k}"})  # fmt: skip
            specs.append({**base, "kind": "serve", "mode": "merged", "adapters": 1, "name": f"{shape}/serve/merged-1"})
            for n in served:
                for kind, mode in (("serve", "routed"), ("serve", "merge-per-request"), ("peft", "peft")):
                    name = f"{shape}/serve/{mode}-{n}"
                    specs.append({**base, "kind": kind, "mode": mode, "adapters": n, "name": name})
            for spec in specs:
                results["configs"][spec["name"]] = run_one(spec, tmp, args.timeout)
    name = f"bank-{stamp}"
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=1, default=float))
    (out_dir / f"{name}.md").write_text(table(results))
    print(table(results))
    print(f"-> {out_dir / name}.{{json,md}}")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        Path(sys.argv[3]).write_text(json.dumps(WORKERS[spec["kind"]](spec), indent=1, default=float))
    else:
        main()
