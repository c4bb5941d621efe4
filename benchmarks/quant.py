"""LoRA over a float or quantized frozen base: step time and training-phase peak memory, lora_jax against Qwix.

```bash
python -m benchmarks.quant                      # a SmolLM2-135M-shaped GPT-2 (576 hidden, 30 layers), 8 x 256, r=16
python -m benchmarks.quant --shape tiny --quick  # does it work? (measures nothing)
```

Each configuration runs in its own process (peak memory never mixes). The model is lora_jax's GPT-2 (causal LM,
dropout off), random-initialised, LoRA r=16 alpha=32 on every linear layer (c_attn, c_proj, c_fc); the step is
lora_jax.train's own (`prepare`: partition, AdamW on the trainable half, jit with donation), on a next-token-style
loss over all positions. Configurations:

| config | base | compute |
|---|---|---|
| `lora_jax/fp32` | float32 | float32 |
| `lora_jax/bf16` | bfloat16 | bfloat16 |
| `lora_jax/nf4`, `lora_jax/int8`, `lora_jax/q4_1` | `quant.quantize_params(params, method)` | float32 |
| `qwix/lora`, `qwix/qlora-nf4` | Qwix's `LoraProvider` on the same Flax model, float32 / nf4 base | float32 |

Step time: median of the timed steps after warm-up, each ending in float(loss). Memory: the process RSS high-water
mark over the timed steps alone (restarted after warm-up, as benchmarks/common.py does), the bytes the frozen base
holds, and XLA's estimate of the compiled step. The 1-minute load average is recorded at the start and the end:
nothing else should run while it measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SHAPES = {
    # SmolLM2-135M's sizes (its MLP is SwiGLU with three 576x1536 matrices; GPT-2's has two 576x2304).
    "smollm2": dict(vocab_size=49152, n_embd=576, n_layer=30, n_head=9, n_inner=2304),
    "gpt2": dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_inner=3072),
    "tiny": dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_inner=256),
}
CONFIGS = ("lora_jax/fp32", "lora_jax/bf16", "lora_jax/nf4", "lora_jax/int8", "lora_jax/q4_1",
           "qwix/lora", "qwix/qlora-nf4")  # fmt: skip
TARGETS = ("c_attn", "c_proj", "c_fc")


@dataclasses.dataclass(frozen=True)
class Run:
    config: str
    shape: str = "smollm2"
    batch: int = 8
    seq: int = 256
    rank: int = 16
    warmup: int = 2
    steps: int = 5


def _model(run: Run, dtype: str):
    import jax

    from lora_jax.models import gpt2

    drop = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = gpt2.Config(**SHAPES[run.shape], n_positions=run.seq, dtype=dtype, param_dtype=dtype, **drop)
    module = gpt2.build(config, "causal-lm")
    ids = jax.numpy.zeros((1, run.seq), jax.numpy.int32)
    return module, ids


def _batch(run: Run) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(0, SHAPES[run.shape]["vocab_size"], (run.batch, run.seq)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids,
            "weights": np.ones(run.batch, np.float32)}  # fmt: skip


def _lora_jax_step(run: Run):
    import jax

    from lora_jax import quant, sharding
    from lora_jax import train as lj_train
    from lora_jax.lora import LoraConfig, lora_wrap
    from lora_jax.models import gpt2

    method = run.config.split("/")[1]
    module, ids = _model(run, "bfloat16" if method == "bf16" else "float32")
    params = jax.jit(module.init)(jax.random.key(0), ids)["params"]
    lora = LoraConfig(r=run.rank, alpha=2 * run.rank, targets=TARGETS, fused=gpt2.FUSED)
    params = lora_wrap(params, lora, jax.random.key(1))
    if method in quant.METHODS:
        params = quant.quantize_params(jax.device_get(params), method)
    config = lj_train.TrainConfig(method="lora", batch_size=run.batch, progress=False)
    mesh = sharding.make_mesh()
    prepared = lj_train.prepare(module, params, config, 0, 10_000, mesh, lora)
    batch = sharding.place_batch(_batch(run), mesh)
    return prepared.train_step, prepared.state, prepared.frozen, batch


def _qwix_step(run: Run):
    import jax
    import qwix

    from lora_jax import sharding
    from lora_jax import train as lj_train
    from lora_jax.methods import partition

    module, ids = _model(run, "float32")
    qtype = "nf4" if "nf4" in run.config else None
    provider = qwix.LoraProvider(module_path=".*(" + "|".join(TARGETS) + ")", rank=run.rank, alpha=2.0 * run.rank,
                                 weight_qtype=qtype, tile_size=64 if qtype else None)  # fmt: skip
    model = qwix.apply_lora_to_model(module, provider)  # linen: no sample inputs
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    mask = jax.tree_util.tree_map_with_path(lambda p, _: "lora_" in jax.tree_util.keystr(p), params)
    trainable, frozen = partition(params, mask)
    config = lj_train.TrainConfig(method="lora", batch_size=run.batch, progress=False)
    tx = lj_train.make_optimizer(config, 10_000)
    step, _ = lj_train.make_steps(model, tx, 0, 0)
    mesh = sharding.make_mesh()
    state = lj_train.TrainState(trainable, tx.init(trainable), jax.numpy.zeros((), jax.numpy.int32))
    return jax.jit(step, donate_argnums=(0,)), state, frozen, sharding.place_batch(_batch(run), mesh)


def measure(run: Run) -> dict[str, Any]:
    import jax
    import numpy as np

    from benchmarks.common import current_rss_mb, peak_rss_mb, reset_peak_rss, summarise
    from lora_jax import quant

    build = _qwix_step if run.config.startswith("qwix/") else _lora_jax_step
    step, initial, frozen, batch = build(run)
    base_mb = quant.base_bytes(frozen) / 2**20
    n_trainable = sum(int(np.size(x)) for x in jax.tree.leaves(initial.trainable))
    state = [initial]
    del initial

    def one(i: int) -> float:
        state[0], loss = step(state[0], frozen, batch)
        return float(loss)

    tick = time.perf_counter()
    losses = [one(0)]
    compile_s = time.perf_counter() - tick
    losses += [one(i) for i in range(1, run.warmup)]
    reset_ok = reset_peak_rss()
    times = []
    for i in range(run.steps):
        tick = time.perf_counter()
        losses.append(one(run.warmup + i))
        times.append(time.perf_counter() - tick)
    mem = step.lower(state[0], frozen, batch).compile().memory_analysis()
    xla = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                    - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / 2**20  # fmt: skip
    return {
        **summarise(times),
        "compile_s": compile_s,
        "peak_rss_training_mb": peak_rss_mb() if reset_ok else None,
        "rss_after_mb": current_rss_mb(),
        "frozen_base_mb": base_mb,
        "xla_step_estimate_mb": xla,
        "trainable_params": n_trainable,
        "losses": losses,
        "losses_finite": bool(np.all(np.isfinite(losses))),
    }


def _worker(run: Run, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.quant", "--worker", json.dumps(dataclasses.asdict(run))]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"exit {done.returncode}: {reason[:300]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| config | step (median s) | vs lora_jax/fp32 | peak RSS, timed steps (MB) | frozen base (MB) | "
            "XLA step estimate (MB) |", "|---|---|---|---|---|---|"]  # fmt: skip
    ref = results.get("lora_jax/fp32", {}).get("median_s")
    for name, r in results.items():
        if "skipped" in r:
            rows.append(f"| {name} | skipped: {r['skipped']} | | | | |")
            continue
        ratio = f"{r['median_s'] / ref:.2f}x" if ref else "-"
        fmt = lambda v: "-" if v is None else f"{v:.0f}"
        rows.append(f"| {name} | {r['median_s']:.3f} | {ratio} | {fmt(r['peak_rss_training_mb'])} | "
                    f"{r['frozen_base_mb']:.1f} | {fmt(r['xla_step_estimate_mb'])} |")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 2 timed steps")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(measure(Run(**json.loads(args.worker)))), flush=True)
        return
    load_start = os.getloadavg()[0]
    results = {}
    for config in args.configs:
        run = Run(config, args.shape, args.batch, args.seq, args.rank, *((1, 2) if args.quick else (2, 5)))
        results[config] = _worker(run, args.timeout)
        print(config, json.dumps({k: v for k, v in results[config].items() if k not in ("times_s", "losses")}))
    load_end = os.getloadavg()[0]
    report = (
        f"{args.shape}, batch {args.batch} x {args.seq}, LoRA r={args.rank} on {', '.join(TARGETS)}; 1-min load "
        f"average {load_start:.1f} at the start, {load_end:.1f} at the end\n\n{table(results)}\n"
    )
    print(report)
    stamp = time.strftime("%Y%m%d-%H%M")
    out = args.out or Path(__file__).parent / "results" / ("raw" if args.quick else "") / f"quant-{stamp}-{args.shape}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"load": [load_start, load_end], "results": results}, indent=1))
    out.with_suffix(".md").write_text(report)


if __name__ == "__main__":
    main()
