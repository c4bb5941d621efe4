"""lora_jax vs HF PEFT + PyTorch on one random-initialised RoBERTa, side by side, in one run.

    python benchmarks/run.py                          # RoBERTa-base, batch 8 x seq 128 (CPU fp32; GPU bf16 seq 512)
    python benchmarks/run.py --shape large
    python benchmarks/run.py --shape tiny --quick     # checks the suite works, measures nothing worth keeping

Every configuration runs in its own process, so peak memory of one never mixes with another's, and jax and torch
never share a device. Writes benchmarks/results/<machine>-<date>-<shape>.{json,md} (quick or tiny runs: under
results/raw/, which git ignores). Nothing else may run on the machine while it measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import flops, report  # noqa: E402
from benchmarks.common import Spec, machine_info  # noqa: E402

LOAD_LIMIT = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(flops.SHAPES), default="base")
    p.add_argument("--seq", type=int, default=None, help="default: 128 on CPU, 512 on GPU")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="few warm-up and timed steps: a smoke test, not a measurement")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU MFU denominator (H100 SXM bf16 dense: 989)")
    p.add_argument("--infer", default="1x128,32x512", help="inference cases, batch x seq, comma separated")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    p.add_argument("--no-infer", action="store_true")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration before it is skipped")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results (raw/ for quick or tiny)")
    return p.parse_args(argv)


def detect_gpu(choice: str) -> bool:
    """Without initialising jax here (its GPU client would take most of the memory the workers need)."""
    if choice != "auto":
        return choice == "gpu"
    import torch

    return torch.cuda.is_available()


def make_checkpoint(shape: flops.Shape, folder: Path) -> None:
    """A random-initialised RobertaForSequenceClassification, saved once; both frameworks load these weights."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.RobertaConfig(**shape.hf_config())
    transformers.RobertaForSequenceClassification(config).save_pretrained(folder)


def run_worker(module: str, spec: Spec, log_dir: Path, name: str, timeout: float) -> dict[str, Any]:
    """One configuration in a fresh process; its output goes to log_dir/<name>.log (kept in the results JSON)."""
    out = log_dir / f"{name.replace('/', '_')}.json"
    log = log_dir / f"{name.replace('/', '_')}.log"
    tick = time.perf_counter()
    print(f"  {name:<24}", end="", flush=True)
    with open(log, "w") as f:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", f"benchmarks.{module}", spec.to_json(), str(out)],
                cwd=ROOT,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            print(f" skipped: timed out after {timeout:.0f} s")
            return {"skipped": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - tick
    if rc != 0 or not out.exists():
        tail = log.read_text().strip().splitlines()[-15:] or ["(no output)"]
        print(f" FAILED (rc {rc}, {wall:.0f} s):\n      " + "\n      ".join(tail))
        return {"error": f"rc {rc}: {tail[-1][:300]}"}
    result = json.loads(out.read_text())
    summary = result.get("skipped") or (f"{1e3 * result['median_s']:.1f} ms" if "median_s" in result else "done")
    print(f" {summary}  ({wall:.0f} s)")
    return result


def machine_slug(info: dict[str, Any], devices: dict[str, Any], gpu: bool) -> str:
    name = next((str(v) for v in devices.values() if v and gpu), None) or info["cpu_model"]
    name = re.sub(r"\(r\)|\(tm\)|cpu|processor|\d+-core", "", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return slug if gpu else f"{slug}-{info['usable_cores']}c"


def git_commit() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "lora_jax"], cwd=ROOT).returncode != 0
        return sha + ("+dirty lora_jax" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def notes_for(results: dict[str, Any]) -> list[str]:
    """Things a reader must know before trusting the numbers, found in the results themselves."""
    notes = []
    if results["meta"]["load_before"] > LOAD_LIMIT:
        notes.append(f"1-min load average was {results['meta']['load_before']:.2f} at start (> {LOAD_LIMIT}).")
    for name, r in results["train"].items():
        if not r or "median_s" not in r:
            continue
        if name.startswith("lora_jax"):
            method = report.method_of(name)
            if r.get("compilations") not in (None, 1):
                notes.append(f"{name}: the step compiled {r['compilations']} times (expected 1).")
            if r.get("warnings"):
                notes.append(f"{name}: warnings: {'; '.join(r['warnings'])}")
            jaxpr, analytic = r.get("jaxpr_matmul_flops"), results["flops"][method]["total"]
            if jaxpr and abs(jaxpr / analytic - 1) > 1e-3:
                notes.append(f"{name}: the jaxpr asks for {jaxpr / analytic:.3f}x the analytic matmul FLOPs.")
            if method == "lora" and (r.get("hlo") or {}).get("vocab_sized"):
                notes.append(f"{name}: vocab-sized buffers in the LoRA step's HLO (embeddings are frozen).")
        if not r.get("losses_finite", True):
            notes.append(f"{name}: non-finite loss.")
    peaks = results["peak"]
    if peaks.get("jax") and peaks.get("jax_end") and "gflops_best" in peaks["jax_end"]:
        drift = peaks["jax_end"]["gflops_best"] / peaks["jax"]["gflops_best"]
        if abs(drift - 1) > 0.1:
            notes.append(
                f"jax matmul peak changed {drift:.2f}x between the start and the end of the run: noisy machine."
            )
    return notes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load = os.getloadavg()[0]
    print("RULE: nothing else may run on this machine while it measures.")
    print(
        f"1-minute load average: {load:.2f}"
        + (f"  WARNING: above {LOAD_LIMIT}; numbers will be noisy." if load > LOAD_LIMIT else "")
    )
    gpu = detect_gpu(args.device)
    seq = args.seq or (512 if gpu else 128)
    warmup, steps = (2, 3) if args.quick else (3, 10)
    infer_cases = tuple(
        (int(b), int(t), 3 if args.quick else (5 if not gpu and int(b) * int(t) > 4096 else 30))
        for b, t in (c.lower().split("x") for c in args.infer.split(","))
    )
    shape = flops.SHAPES[args.shape]
    if max([seq] + [t for _, t, _ in infer_cases]) > shape.max_positions - 2:
        raise SystemExit(f"seq must be <= {shape.max_positions - 2} (RoBERTa's positions start at 2).")
    matmul = (1024 if args.quick else 4096) if not gpu else 8192
    out_dir = args.out or (ROOT / "benchmarks" / "results" / ("raw" if args.quick or args.shape == "tiny" else ""))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")

    base = Spec(
        task="train",
        shape=args.shape,
        batch=args.batch,
        seq=seq,
        gpu=gpu,
        warmup=warmup,
        steps=steps,
        matmul_size=matmul,
        infer_cases=infer_cases,
    )
    info = machine_info()
    print(
        f"RoBERTa-{args.shape} ({shape.hidden} hidden, {shape.layers} layers), batch {args.batch} x seq {seq}, "
        f"{'bf16 on GPU' if gpu else 'fp32 on CPU'}, {warmup} warm-up + {steps} timed steps"
    )
    results: dict[str, Any] = {
        "meta": {
            "shape": args.shape,
            "model": dataclasses.asdict(shape),
            "batch": args.batch,
            "seq": seq,
            "gpu": gpu,
            "dtype": "bf16 compute, fp32 params" if gpu else "fp32",
            "quick": args.quick,
            "warmup": warmup,
            "steps": steps,
            "date": stamp,
            "git_commit": git_commit(),
            "machine": info,
            "load_before": load,
            "peak_tflops": args.peak_tflops if gpu else None,
            "lora": {
                "r": base.lora_rank,
                "alpha": base.lora_rank,
                "targets": list(flops.LORA_MODULES),
                "train_also": ["classifier"],
            },
        },
        "flops": {m: flops.train_step_flops(shape, args.batch, seq, m, base.lora_rank) for m in ("lora", "full")},
        "peak": {},
        "train": {},
    }
    with tempfile.TemporaryDirectory(prefix="lora_jax_bench_") as tmp:
        tmp = Path(tmp)
        ckpt, logs = tmp / "roberta", tmp / "logs"
        logs.mkdir()
        print("building the random-initialised checkpoint ...", flush=True)
        make_checkpoint(shape, ckpt)
        base = dataclasses.replace(base, checkpoint=str(ckpt))
        peak = dataclasses.replace(base, task="peak", warmup=2, steps=3 if args.quick else 10)
        print("measuring:")
        results["peak"]["jax"] = run_worker("jax_worker", peak, logs, "peak/jax", args.timeout)
        results["peak"]["torch"] = run_worker("torch_worker", peak, logs, "peak/torch", args.timeout)
        configs = [
            ("lora_jax/lora", "jax_worker", {"method": "lora"}),
            ("peft/eager", "torch_worker", {"method": "lora"}),
            ("lora_jax/full", "jax_worker", {"method": "full"}),
            ("lora_jax/lora-remat", "jax_worker", {"method": "lora", "remat": "full"}),
            ("lora_jax/lora-nodropout", "jax_worker", {"method": "lora", "no_dropout": True}),
            ("torch/full-eager", "torch_worker", {"method": "full"}),
            ("peft/compile", "torch_worker", {"method": "lora", "compile": True}),
            ("torch/full-compile", "torch_worker", {"method": "full", "compile": True}),
        ]
        for name, module, overrides in configs:
            if overrides.get("compile") and args.no_compile:
                results["train"][name] = {"skipped": "--no-compile"}
                continue
            spec = dataclasses.replace(base, **overrides)
            results["train"][name] = run_worker(module, spec, logs, name, args.timeout)
        if not args.no_infer:
            results["infer"] = run_worker(
                "jax_worker", dataclasses.replace(base, task="infer"), logs, "infer/jax", args.timeout
            )
        results["peak"]["jax_end"] = run_worker("jax_worker", peak, logs, "peak/jax (end)", args.timeout)
        results["logs"] = {p.stem: p.read_text()[-4000:] for p in sorted(logs.glob("*.log")) if p.stat().st_size}

    results["meta"]["load_after"] = os.getloadavg()[0]
    results["meta"]["devices"] = {
        "jax": ", ".join((results["peak"].get("jax") or {}).get("devices", [])) or None,
        "torch": (results["peak"].get("torch") or {}).get("device"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{machine_slug(info, results['meta']['devices'], gpu)}-{stamp}-{args.shape}"
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1, default=float))  # measurements first
    report.enrich(results)
    results["ratios"] = report.ratios(results)
    results["notes"] = notes_for(results)
    text = report.markdown(results)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1, default=float))
    (out_dir / f"{stem}.md").write_text(text)
    print()
    print(text)
    print(f"wrote {out_dir / stem}.json and .md")
    return results


if __name__ == "__main__":
    main()
