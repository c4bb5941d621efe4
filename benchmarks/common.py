"""Timing, memory and machine description shared by the jax and torch workers (no jax or torch imported here)."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.flops import SHAPES, Shape


@dataclasses.dataclass(frozen=True)
class Spec:
    """One measurement, as handed from run.py to a worker process (JSON on the command line)."""

    task: str  # "peak" | "train" | "infer"
    checkpoint: str = ""
    shape: str = "base"
    method: str = "lora"  # train: "lora" | "full"
    compile: bool = False  # torch only: torch.compile the model
    batch: int = 8
    seq: int = 128
    gpu: bool = False  # bf16 compute on the accelerator; fp32 on CPU
    warmup: int = 3
    steps: int = 10
    lora_rank: int = 8
    remat: str = ""  # jax only: the models' `remat` setting ("" = off, "dots", "full")
    no_dropout: bool = False  # jax only: hidden and attention dropout off, to price dropout's random bits
    matmul_size: int = 4096
    infer_cases: tuple[tuple[int, int, int], ...] = ((1, 128, 10), (32, 512, 5))  # (batch, seq, timed reps)

    @property
    def model_shape(self) -> Shape:
        return SHAPES[self.shape]

    @property
    def matmul_shapes(self) -> list[tuple[int, int, int]]:
        """(m, k, n) products timed for the machine's peak: the square one, and the step's own feed-forward
        matmuls (tokens x hidden x ffn and back), which on a CPU can run faster than the big square one."""
        tokens, s = self.batch * self.seq, self.model_shape
        n = self.matmul_size
        return [(n, n, n), (tokens, s.hidden, s.ffn), (tokens, s.ffn, s.hidden)]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        d = json.loads(text)
        d["infer_cases"] = tuple(tuple(c) for c in d["infer_cases"])
        return cls(**d)


def best_of_shapes(per_shape: list[dict[str, Any]]) -> dict[str, Any]:
    """The peak entry of a worker: every shape's rates, and the best of them as the machine's peak."""
    best = max(per_shape, key=lambda r: r["gflops_best"])
    return {"shapes": per_shape, "gflops_best": best["gflops_best"], "gflops_median": best["gflops_median"]}


def shape_rates(m: int, k: int, n: int, timing: dict[str, Any]) -> dict[str, Any]:
    flops = 2 * m * k * n
    return {"mkn": [m, k, n], "gflops_best": flops / timing["min_s"] / 1e9,
            "gflops_median": flops / timing["median_s"] / 1e9}  # fmt: skip


def time_calls(fn: Callable[[], Any], warmup: int, steps: int) -> dict[str, Any]:
    """Median (and spread) of `steps` calls after `warmup` calls; `fn` must block until its work is done."""
    tick = time.perf_counter()
    fn()
    first = time.perf_counter() - tick
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return summarise(times) | {"first_call_s": first}


def summarise(times: list[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "iqr_s": float(np.subtract(*np.percentile(times, [75, 25]))) if len(times) > 1 else 0.0,
        "times_s": times,
    }


# ---------------------------------------------------------------------------------------------------------------
# Host memory: the RSS high-water mark, and a way to restart it once setup and compilation are over
# ---------------------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Process RSS high-water mark (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def release_free_heap() -> None:
    """Hand malloc's free lists back to the OS (glibc's malloc_trim), so RSS counts memory in use rather than
    what loading the checkpoint freed but glibc kept cached. A no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs), so the
    training-phase peak excludes checkpoint loading and compilation. Freed heap goes back to the OS first, in
    both frameworks' workers alike. False where the kernel refuses."""
    gc.collect()
    release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the numbers depend on; accelerator names come from the workers (jax and torch each report theirs)."""
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            mem_gb = int(f.readline().split()[1]) / 2**20
    except OSError:
        pass
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": versions,
        "load_average_1m": os.getloadavg()[0],
    }


def random_batch(shape: Shape, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids that are never padding (RoBERTa pads with 1), <s> first; every row real."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, shape.vocab, size=(batch, seq), dtype=np.int32)
    ids[:, 0] = 0
    return {
        "input_ids": ids,
        "attention_mask": np.ones((batch, seq), np.int32),
        "labels": rng.integers(0, shape.num_labels, size=(batch,), dtype=np.int32),
        "weights": np.ones((batch,), np.float32),
    }


def worker_main(run: Callable[[Any], dict[str, Any]], spec_class: Any = Spec) -> None:
    """`python -m benchmarks.<worker> SPEC_JSON OUT_JSON`: run one measurement and write its result."""
    spec, out = spec_class.from_json(sys.argv[1]), Path(sys.argv[2])
    result = run(spec)
    out.write_text(json.dumps(result, indent=1, default=float))
