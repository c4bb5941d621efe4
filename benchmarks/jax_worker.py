"""One lora_jax measurement per process: the matmul peak, a training step (LoRA or full), or inference latency.

The training step is lora_jax.train's own: `make_steps`, `objective.make_optimizer`, `methods.trainable_mask`,
jitted over the same one-axis mesh with the same output shardings and the same donation as `train()`.
"""

from __future__ import annotations

import re
import time
import warnings
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops
from benchmarks.common import (
    Spec,
    best_of_shapes,
    current_rss_mb,
    peak_rss_mb,
    random_batch,
    reset_peak_rss,
    shape_rates,
    summarise,
    time_calls,
    worker_main,
)
from lora_jax import sharding
from lora_jax import train as lj_train
from lora_jax.lora import lora_wrap, merge
from lora_jax.models import hub


def describe_devices() -> dict[str, Any]:
    devices = jax.devices()
    return {"backend": jax.default_backend(), "devices": [d.device_kind for d in devices], "count": len(devices)}


def check_backend(spec: Spec) -> None:
    if spec.gpu and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu, but jax's backend is {jax.default_backend()!r}; install jax[cuda12].")


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()  # None on CPU
    return None if not stats else stats.get("peak_bytes_in_use")


def load(spec: Spec):
    dtype = jnp.bfloat16 if spec.gpu else jnp.float32
    remat = {"": False, "full": True}.get(spec.remat, spec.remat)
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if spec.no_dropout else {}
    module, params, _, config = hub.from_pretrained(
        spec.checkpoint, task="sequence-classification", num_labels=2, dtype=dtype, remat=remat, **no_dropout
    )
    return module, params, config


def lora_config(spec: Spec):
    """The paper's GLUE setting: r = 8, alpha = 8 on W_q and W_v; the classification head trains too."""
    return hub.lora_config(
        "roberta", flops.LORA_MODULES, r=spec.lora_rank, alpha=spec.lora_rank, train_also=("classifier",)
    )


# ---------------------------------------------------------------------------------------------------------------
# Matmul peak
# ---------------------------------------------------------------------------------------------------------------


def peak(spec: Spec) -> dict[str, Any]:
    check_backend(spec)
    dtype = jnp.bfloat16 if spec.gpu else jnp.float32
    matmul, per_shape = jax.jit(jnp.dot), []
    for m, k, n in spec.matmul_shapes:
        ka, kb = jax.random.split(jax.random.key(0))
        a, b = jax.random.normal(ka, (m, k), dtype), jax.random.normal(kb, (k, n), dtype)
        timing = time_calls(lambda: matmul(a, b).block_until_ready(), spec.warmup, spec.steps)  # noqa: B023
        per_shape.append(shape_rates(m, k, n, timing))
    return {**best_of_shapes(per_shape), "dtype": str(jnp.dtype(dtype)), **describe_devices()}


# ---------------------------------------------------------------------------------------------------------------
# Training step
# ---------------------------------------------------------------------------------------------------------------


def train(spec: Spec) -> dict[str, Any]:
    check_backend(spec)
    rss_start = current_rss_mb()
    module, params, _ = load(spec)
    lcfg = lora_config(spec) if spec.method == "lora" else None
    if lcfg is not None:
        params = lora_wrap(params, lcfg, jax.random.key(0))

    # As lora_jax.train.train() sets up its step, minus checkpoints and logging.
    config = lj_train.TrainConfig(method=spec.method, batch_size=spec.batch, progress=False)
    mesh = sharding.make_mesh()
    prepared = lj_train.prepare(module, params, config, num_labels=2, total_micro_steps=10_000, mesh=mesh,
                                lora_config=lcfg)  # fmt: skip
    del params
    jitted, frozen = prepared.train_step, prepared.frozen
    trainable = prepared.state.trainable
    step_fn = jitted.__wrapped__
    batch = sharding.place_batch(random_batch(spec.model_shape, spec.batch, spec.seq), mesh)
    n_trainable = sum(int(np.size(x)) for x in jax.tree.leaves(trainable))
    n_total = n_trainable + sum(int(np.size(x)) for x in jax.tree.leaves(frozen))

    state = {"train": prepared.state}
    del trainable, prepared
    losses = []

    def one_step() -> None:
        # A fresh step number (new dropout masks) and float(loss), which waits for the step.
        state["train"], loss = jitted(state["train"], frozen, batch)
        losses.append(float(loss))

    rss_setup = current_rss_mb()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tick = time.perf_counter()
        one_step()
        compile_s = time.perf_counter() - tick
    for _ in range(spec.warmup - 1):
        one_step()
    reset_ok = reset_peak_rss()
    times = []
    for _ in range(spec.steps):
        tick = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - tick)
    train_phase_peak = peak_rss_mb() if reset_ok else None
    device_peak = device_peak_bytes()

    args = (state["trainable"], state["opt_state"], frozen, batch, jnp.asarray(0, jnp.int32))
    analysis = analyse(jitted, step_fn, args, spec)
    timing = summarise(times)
    return {
        **timing,
        "compile_s": compile_s,
        "tokens_per_s": spec.batch * spec.seq / timing["median_s"],
        "final_loss": losses[-1],
        "losses_finite": bool(np.all(np.isfinite(losses))),
        "trainable_params": n_trainable,
        "total_params": n_total,
        "memory": {
            "rss_at_start_mb": rss_start,
            "rss_after_setup_mb": rss_setup,
            "peak_rss_process_mb": peak_rss_mb(),
            "peak_rss_training_mb": train_phase_peak,
            "device_peak_bytes": device_peak,
        },
        "compilations": _cache_size(jitted),
        "warnings": sorted({str(w.message).splitlines()[0] for w in caught}),
        **analysis,
        **describe_devices(),
    }


def _cache_size(jitted) -> int | None:
    try:
        return int(jitted._cache_size())  # private, but the one way to see recompilation from outside
    except AttributeError:
        return None


def analyse(jitted, step_fn, args, spec: Spec) -> dict[str, Any]:
    """XLA's FLOP and memory estimates of the compiled step, the jaxpr's matmul FLOPs, and what the HLO holds."""
    step_jaxpr = jax.make_jaxpr(step_fn)(*args)
    tick = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    relower_s = time.perf_counter() - tick
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    memory = None
    if mem is not None:
        memory = {
            k: getattr(mem, k)
            for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
        }
        memory["peak_estimate_bytes"] = (
            memory["argument_size_in_bytes"]
            + memory["output_size_in_bytes"]
            - memory["alias_size_in_bytes"]
            + memory["temp_size_in_bytes"]
        )
    return {
        "xla_flops": float(cost.get("flops", float("nan"))) if cost else None,
        "xla_bytes_accessed": float(cost.get("bytes accessed", float("nan"))) if cost else None,
        "xla_memory": memory,
        "jaxpr_matmul_flops": flops.jaxpr_matmul_flops(step_jaxpr),
        "matmuls_alone": time_matmuls_alone(flops.jaxpr_matmuls(step_jaxpr)),
        "hlo": hlo_stats(compiled.as_text(), spec),
        "relower_compile_s": relower_s,
    }


def time_matmuls_alone(matmuls: dict[flops.Matmul, int]) -> dict[str, Any]:
    """Each distinct dot_general of the step, jitted and timed on its own, times how often the step runs it.

    Their sum is what the step's matrix products cost on this machine at their own shapes and layouts, with
    everything else (dropout bits, softmax, LayerNorm, GELU, AdamW) free: the fastest the step could be without
    faster matmuls. A jitted call's fixed dispatch cost, timed on a one-element add, is taken off each dot."""
    key = jax.random.key(1)
    noop = jax.jit(lambda x: x + 1)
    one = jnp.zeros((), jnp.float32)
    dispatch_s = time_calls(lambda: noop(one).block_until_ready(), 5, 50)["min_s"]
    rows, total_median, total_min = [], 0.0, 0.0
    for m, count in sorted(matmuls.items(), key=lambda item: -item[0].flops * item[1]):
        ka, kb, key = jax.random.split(key, 3)
        a = jax.random.normal(ka, m.lhs_shape, m.dtype)
        b = jax.random.normal(kb, m.rhs_shape, m.dtype)
        dot = jax.jit(lambda x, y, dims=m.dimension_numbers: jax.lax.dot_general(x, y, dims))
        timing = time_calls(lambda: dot(a, b).block_until_ready(), 2, 7)  # noqa: B023
        median_s = max(timing["median_s"] - dispatch_s, 0.0)
        min_s = max(timing["min_s"] - dispatch_s, 0.0)
        total_median += count * median_s
        total_min += count * min_s
        rows.append({"lhs": list(m.lhs_shape), "rhs": list(m.rhs_shape), "dims": m.dimension_numbers,
                     "count": count, "gflop_each": m.flops / 1e9, "median_ms": 1e3 * median_s,
                     "gflops": m.flops / median_s / 1e9 if median_s else None})  # fmt: skip
    total_flops = sum(m.flops * c for m, c in matmuls.items())
    return {"sum_median_s": total_median, "sum_min_s": total_min, "flops": total_flops,
            "gflops": total_flops / total_median / 1e9 if total_median else None,
            "dispatch_s": dispatch_s, "distinct": len(rows), "dots": sum(matmuls.values()), "each": rows}  # fmt: skip


def hlo_stats(text: str, spec: Spec) -> dict[str, Any]:
    """Op counts of the optimised HLO that expose known waste: vocab x hidden buffers computed (not just passed
    in) mean a dense embedding gradient and its AdamW update; the integer ops (xor, shifts) are threefry, the
    dropout masks' random bits."""
    instruction = re.compile(r"^\s*(?:ROOT\s+)?%\S+ = (\S+) ([\w-]+)\(")
    ops, vocab_sized = {}, 0
    vocab_shape = f"[{spec.model_shape.vocab},{spec.model_shape.hidden}]"
    for line in text.splitlines():
        m = instruction.match(line)
        if not m:
            continue
        shape, op = m.groups()
        ops[op] = ops.get(op, 0) + 1
        vocab_sized += op != "parameter" and vocab_shape in shape
    keys = ("dot", "custom-call", "fusion", "scatter", "copy", "transpose", "xor", "shift-right-logical")
    return {"instructions": sum(ops.values()), **{k: ops.get(k, 0) for k in keys}, "vocab_sized": vocab_sized}


# ---------------------------------------------------------------------------------------------------------------
# Inference latency: the base model, LoRA merged into it, and LoRA unmerged (the extra low-rank path)
# ---------------------------------------------------------------------------------------------------------------


def _trained_looking(params: Any, scale: float = 0.02) -> Any:
    """LoRA's B starts at zero; give it values, as after training, so that merging changes the kernels."""
    key = jax.random.key(1)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if not name.startswith("lora_b"):
            return leaf
        k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()))
        return (scale * jax.random.normal(k, leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, params)


def infer(spec: Spec) -> dict[str, Any]:
    check_backend(spec)
    module, base, _ = load(spec)
    unmerged = _trained_looking(lora_wrap(base, lora_config(spec), jax.random.key(0)))
    merged = merge(unmerged)
    variants = {"base": base, "merged": merged, "unmerged": unmerged}

    @jax.jit
    def forward(params, input_ids, attention_mask):
        out = module.apply({"params": params}, input_ids, attention_mask, deterministic=True)
        return out["logits"]

    cases = []
    for batch, seq, reps in spec.infer_cases:
        data = random_batch(spec.model_shape, batch, seq)
        ids, mask = jnp.asarray(data["input_ids"]), jnp.asarray(data["attention_mask"])
        run = {n: (lambda p=p, i=ids, m=mask: forward(p, i, m).block_until_ready()) for n, p in variants.items()}
        first = {}
        for name, fn in run.items():
            tick = time.perf_counter()
            fn()
            first[name] = time.perf_counter() - tick
            for _ in range(spec.warmup - 1):
                fn()
        times: dict[str, list[float]] = {name: [] for name in run}
        for rep in range(reps):  # interleaved, rotating the order, so drift hits every variant alike
            names = list(run)
            names = names[rep % len(names) :] + names[: rep % len(names)]
            for name in names:
                tick = time.perf_counter()
                run[name]()
                times[name].append(time.perf_counter() - tick)
        merged_vs_unmerged = float(
            jnp.max(jnp.abs(forward(merged, ids, mask).astype(jnp.float32) - forward(unmerged, ids, mask)))
        )
        cases.append(
            {
                "batch": batch,
                "seq": seq,
                "variants": {n: summarise(t) | {"first_call_s": first[n]} for n, t in times.items()},
                "merged_vs_unmerged_max_abs_logit_diff": merged_vs_unmerged,
                "flops": {
                    "base": flops.inference_flops(spec.model_shape, batch, seq),
                    "unmerged": flops.inference_flops(spec.model_shape, batch, seq, spec.lora_rank),
                },
            }
        )
    return {"cases": cases, "compilations": _cache_size(forward), **describe_devices()}


TASKS = {"peak": peak, "train": train, "infer": infer}

if __name__ == "__main__":
    worker_main(lambda spec: TASKS[spec.task](spec))
