"""One PyTorch measurement per process: the matmul peak, or a training step of HF RoBERTa (PEFT LoRA or full).

Set up as lora_jax's step is: AdamW with decay on >= 2-D params only, dropout 0.1 in training mode, the same
LoRA (r = 8, alpha = 8 on query and value; PEFT's SEQ_CLS task keeps the classifier trainable), fp32 on CPU and
bf16 autocast over fp32 weights on GPU (lora_jax: dtype=bfloat16, param_dtype=float32).
"""

from __future__ import annotations

import contextlib
import time
import traceback
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    Spec,
    best_of_shapes,
    current_rss_mb,
    peak_rss_mb,
    random_batch,
    reset_peak_rss,
    shape_rates,
    summarise,
    worker_main,
)


def _device(spec: Spec) -> torch.device:
    if spec.gpu and not torch.cuda.is_available():
        raise SystemExit("--device gpu, but torch sees no CUDA device; install a CUDA build of torch.")
    return torch.device("cuda" if spec.gpu else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def describe_devices(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"device": name, "torch_threads": torch.get_num_threads()}


def peak(spec: Spec) -> dict[str, Any]:
    device = _device(spec)
    dtype = torch.bfloat16 if spec.gpu else torch.float32
    gen = torch.Generator().manual_seed(0)
    per_shape = []
    for m, k, n in spec.matmul_shapes:
        a = torch.randn(m, k, generator=gen).to(device, dtype)
        b = torch.randn(k, n, generator=gen).to(device, dtype)
        times = []
        for i in range(spec.warmup + spec.steps):
            _sync(device)
            tick = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            if i >= spec.warmup:
                times.append(time.perf_counter() - tick)
        per_shape.append(shape_rates(m, k, n, summarise(times)))
    return {**best_of_shapes(per_shape), "dtype": str(dtype), **describe_devices(device)}


def build(spec: Spec, device: torch.device):
    import transformers

    torch.manual_seed(0)
    model = transformers.RobertaForSequenceClassification.from_pretrained(spec.checkpoint).to(device)
    model.train()
    if spec.method == "lora":
        import peft

        config = peft.LoraConfig(
            task_type=peft.TaskType.SEQ_CLS,
            r=spec.lora_rank,
            lora_alpha=spec.lora_rank,
            lora_dropout=0.0,
            target_modules=["query", "value"],
        )
        model = peft.get_peft_model(model, config)
    return model


def train(spec: Spec) -> dict[str, Any]:
    device = _device(spec)
    rss_start = current_rss_mb()
    model = build(spec, device)
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=4e-4 if spec.method == "lora" else 1e-5,
    )
    data = random_batch(spec.model_shape, spec.batch, spec.seq)
    inputs = {
        "input_ids": torch.from_numpy(data["input_ids"]).long().to(device),
        "attention_mask": torch.from_numpy(data["attention_mask"]).long().to(device),
        "labels": torch.from_numpy(data["labels"]).long().to(device),
    }
    forward = torch.compile(model) if spec.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    losses = []

    def one_step() -> None:
        with autocast:
            loss = forward(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # waits for the step, as float(loss) does in lora_jax's loop

    rss_setup = current_rss_mb()
    tick = time.perf_counter()
    try:
        one_step()
    except Exception as e:  # noqa: BLE001  torch.compile's failures are many and varied; report, do not crash
        if not spec.compile:
            raise
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return {"skipped": f"torch.compile failed: {reason[:300]}", "traceback": traceback.format_exc()[-2000:]}
    compile_s = time.perf_counter() - tick
    for _ in range(spec.warmup - 1):
        one_step()
    reset_ok = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec.steps):
        tick = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - tick)
    timing = summarise(times)
    return {
        **timing,
        "compile_s": compile_s,
        "tokens_per_s": spec.batch * spec.seq / timing["median_s"],
        "final_loss": losses[-1],
        "losses_finite": bool(np.all(np.isfinite(losses))),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "attn_implementation": attn,
        "memory": {
            "rss_at_start_mb": rss_start,
            "rss_after_setup_mb": rss_setup,
            "peak_rss_process_mb": peak_rss_mb(),
            "peak_rss_training_mb": peak_rss_mb() if reset_ok else None,
            "device_peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        },
        **describe_devices(device),
    }


TASKS = {"peak": peak, "train": train}

if __name__ == "__main__":
    worker_main(lambda spec: TASKS[spec.task](spec))
