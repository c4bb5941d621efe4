"""One JAX measurement of benchmarks/quant.py per process: lora_jax's LoRA, or Qwix's LoRA/QLoRA, on lora_jax's Flax
Llama loaded from the same checkpoint, trained by the same step (lora_jax.train's `make_steps` + AdamW, jitted
with the state donated). The two differ only in how LoRA is attached and how the frozen base is quantized."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from benchmarks.common import current_rss_mb, worker_main
from benchmarks.quant import LINEAR, QuantSpec, lm_batch, timed_training
from lora_jax import sharding
from lora_jax import train as lj_train
from lora_jax.lora import lora_wrap
from lora_jax.models import hub
from lora_jax.quant import is_quantized
from lora_jax.tree import map_with_path


def stored_bytes(tree: Any) -> int:
    """Bytes the leaves hold at their dtypes' widths (4-bit types count half a byte, as they pack)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        dtype = np.dtype(leaf.dtype)
        if jnp.issubdtype(dtype, jnp.floating):
            bits = jnp.finfo(dtype).bits
        elif jnp.issubdtype(dtype, jnp.integer):
            bits = jnp.iinfo(dtype).bits
        else:
            bits = 8 * dtype.itemsize
        total += int(np.size(leaf)) * bits // 8
    return total


def load(spec: QuantSpec, quantize: str | None, quantize_embedding: bool = False):
    dtype = jnp.bfloat16 if spec.base == "bfloat16" else jnp.float32
    module, params, _, _ = hub.from_pretrained(spec.checkpoint, task="causal-lm", dtype=dtype, param_dtype=dtype,
                                               quantize=quantize, quantize_embedding=quantize_embedding)  # fmt: skip
    return module, params


def lora_jax_setup(spec: QuantSpec):
    """lora_jax: the base quantized on loading (nf4; gguf keeps the file's Q4_1 blocks; "+table": the token table
    too), then `lora_wrap`; the step is `train.prepare`'s, as `train()` runs it."""
    base, _, table = spec.base.partition("+")
    quantize = {"nf4": "nf4", "gguf": "gguf" if spec.checkpoint.endswith(".gguf") else "q4_1"}.get(base)
    module, params = load(spec, quantize, quantize_embedding=table == "table")
    lora = hub.lora_config("llama", ("all-linear",), r=spec.rank, alpha=2.0 * spec.rank)
    params = lora_wrap(params, lora, jax.random.key(0))
    config = lj_train.TrainConfig(method="lora", batch_size=spec.batch, progress=False)
    mesh = sharding.make_mesh()
    prepared = lj_train.prepare(module, params, config, 0, 10_000, mesh, lora)
    return prepared.train_step, prepared.state, prepared.frozen, mesh


def qwix_setup(spec: QuantSpec):
    """Qwix: its LoraProvider over the same float module; QLoRA quantizes the kernels to nf4 (tiles of 64, as
    QLoRA's blocks) with `qwix.quantize_params`. The LoRA A/B leaves come from the Qwix model's own init; the step
    is `train.prepare`'s with Qwix's `*_lora_a/b` leaves as the trainable half."""
    import qwix

    module, params = load(spec, None)
    nf4 = spec.base == "nf4"
    provider = qwix.LoraProvider(module_path=".*(" + "|".join(LINEAR) + ")", rank=spec.rank, alpha=2.0 * spec.rank,
                                 weight_qtype="nf4" if nf4 else None, tile_size=64 if nf4 else None)  # fmt: skip
    model = qwix.apply_lora_to_model(module, provider)
    ids = jnp.zeros((1, spec.seq), jnp.int32)
    init = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    params = jax.tree.map(jnp.asarray, params)
    if nf4:
        params = qwix.quantize_params(params, jax.eval_shape(model.init, jax.random.key(0), ids)["params"])
    lora = {k: v for k, v in traverse_util.flatten_dict(init).items() if "_lora_" in k[-1]}
    params = traverse_util.unflatten_dict({**traverse_util.flatten_dict(params), **lora})
    del init
    config = lj_train.TrainConfig(method="lora", batch_size=spec.batch, progress=False)
    mesh = sharding.make_mesh()
    mask = map_with_path(lambda path, _: "_lora_" in path, params)
    prepared = lj_train.prepare(model, params, config, 0, 10_000, mesh, mask=mask)
    return prepared.train_step, prepared.state, prepared.frozen, mesh


def train(spec: QuantSpec) -> dict[str, Any]:
    rss_start = current_rss_mb()
    step, state, frozen, mesh = (qwix_setup if spec.framework == "qwix" else lora_jax_setup)(spec)
    batch = sharding.place_batch(lm_batch(spec, shifted=True), mesh)
    holder = [state]
    del state
    n_trainable = sum(int(np.size(x)) for x in jax.tree.leaves(holder[0].trainable))
    quantized = sum(is_quantized(x) for x in jax.tree.leaves(frozen, is_leaf=is_quantized))

    def one_step() -> float:
        holder[0], loss = step(holder[0], frozen, batch)
        return float(loss)

    rss_setup = current_rss_mb()
    timing = timed_training(one_step, spec)
    mem = step.lower(holder[0], frozen, batch).compile().memory_analysis()
    xla = None
    if mem is not None:
        xla = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
               + mem.temp_size_in_bytes) / 2**20  # fmt: skip
    return {
        **timing,
        "tokens_per_s": spec.batch * spec.seq / timing["median_s"],
        "trainable_params": n_trainable,
        "frozen_base_mb": stored_bytes(frozen) / 2**20,
        "trainable_mb": stored_bytes(holder[0].trainable) / 2**20,
        "lora_jax_quantized_kernels": quantized,
        "xla_step_estimate_mb": xla,
        "rss_at_start_mb": rss_start,
        "rss_after_setup_mb": rss_setup,
        "backend": jax.default_backend(),
    }


if __name__ == "__main__":
    worker_main(train, QuantSpec)
