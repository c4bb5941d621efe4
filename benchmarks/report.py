"""Ratios with the issue's targets, and the markdown table, from the results run.py collected (pure functions)."""

from __future__ import annotations

from typing import Any

# The issue's targets (CPU). On a GPU they are printed for reference; MFU is reported there instead of the floor.
TARGETS = {
    "lora_vs_peft_eager": (">=", 1.1),
    "lora_fraction_of_floor": (">=", 0.90),
    "full_vs_torch_eager": (">=", 1.3),
    "lora_over_full_time": ("<=", 0.70),
    "lora_over_full_memory": ("<=", 0.6),
    "merged_over_base": ("within", 0.02),
}


def _ok(result: dict[str, Any] | None) -> bool:
    return bool(result) and "median_s" in result


def step_memory_mb(result: dict[str, Any]) -> float | None:
    """Training-phase peak: device memory on a GPU, else the host RSS high-water mark restarted after warm-up."""
    mem = result.get("memory", {})
    if mem.get("device_peak_bytes"):
        return mem["device_peak_bytes"] / 2**20
    return mem.get("peak_rss_training_mb") or mem.get("peak_rss_process_mb")


def machine_peak_flops(results: dict[str, Any]) -> float | None:
    """The best matmul rate either framework reached: what 'the machine can do' for the floor."""
    rates = [p["gflops_best"] for p in results.get("peak", {}).values() if p and "gflops_best" in p]
    return max(rates) * 1e9 if rates else None


def median_peak_flops(results: dict[str, Any]) -> float | None:
    """The best framework's median matmul rate: a step's median time compared like with like (information)."""
    rates = [p["gflops_median"] for p in results.get("peak", {}).values() if p and "gflops_median" in p]
    return max(rates) * 1e9 if rates else None


def method_of(config: str) -> str:
    """"lora" or "full": which FLOP count a training config is charged (lora_jax/full is full FT)."""
    return "lora" if config.startswith("peft/") or config.split("/")[-1].startswith("lora") else "full"


def enrich(results: dict[str, Any]) -> None:
    """Add achieved FLOP/s, fraction of the measured peak and (GPU) MFU to each training result, in place."""
    peak = machine_peak_flops(results)
    spec_peak = results["meta"].get("peak_tflops")
    for name, r in results["train"].items():
        if not _ok(r):
            continue
        method = method_of(name)
        analytic = results["flops"][method]["total"]
        r["achieved_flops_per_s"] = analytic / r["median_s"]
        r["fraction_of_measured_peak"] = r["achieved_flops_per_s"] / peak if peak else None
        median_peak = median_peak_flops(results)
        r["fraction_of_median_peak"] = r["achieved_flops_per_s"] / median_peak if median_peak else None
        r["mfu"] = r["achieved_flops_per_s"] / (spec_peak * 1e12) if results["meta"]["gpu"] and spec_peak else None


def _check(key: str, value: float | None) -> dict[str, Any]:
    op, bound = TARGETS[key]
    if value is None:
        passed = None
    elif op == ">=":
        passed = value >= bound
    elif op == "<=":
        passed = value <= bound
    else:
        passed = abs(value - 1) <= bound
    target = f"{op} {bound}" if op != "within" else f"1 +- {bound:.0%}"
    return {"value": value, "target": target, "pass": passed}


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    t = results["train"]

    def time_ratio(a: str, b: str) -> float | None:
        return t[a]["median_s"] / t[b]["median_s"] if _ok(t.get(a)) and _ok(t.get(b)) else None

    rows = []

    def add(name: str, value: float | None, key: str | None = None) -> None:
        row = {"name": name, **(_check(key, value) if key else {"value": value, "target": "", "pass": None})}
        rows.append(row)

    add(
        "LoRA step: speedup of lora_jax over PEFT eager",
        time_ratio("peft/eager", "lora_jax/lora"),
        "lora_vs_peft_eager",
    )
    add("LoRA step: speedup of lora_jax over PEFT torch.compile", time_ratio("peft/compile", "lora_jax/lora"))
    floor = t.get("lora_jax/lora", {}).get("fraction_of_measured_peak") if _ok(t.get("lora_jax/lora")) else None
    if results["meta"]["gpu"]:
        add("LoRA step: fraction of the measured matmul peak", floor)
        add("LoRA step: MFU (of --peak-tflops)", t["lora_jax/lora"].get("mfu") if _ok(t.get("lora_jax/lora")) else None)
        add(
            "full FT step: MFU (of --peak-tflops)",
            t["lora_jax/full"].get("mfu") if _ok(t.get("lora_jax/full")) else None,
        )
    else:
        add("LoRA step: fraction of the FLOP floor (best matmul rate measured)", floor, "lora_fraction_of_floor")
        lora = t.get("lora_jax/lora")
        add("LoRA step: same, at the median matmul rate", lora.get("fraction_of_median_peak") if _ok(lora) else None)
        add("LoRA step: its ceiling, with everything but its matmuls free", matmul_ceiling(results, "lora_jax/lora"))
    add(
        "full FT step: speedup of lora_jax over torch eager",
        time_ratio("torch/full-eager", "lora_jax/full"),
        "full_vs_torch_eager",
    )
    add("full FT step: speedup of lora_jax over torch.compile", time_ratio("torch/full-compile", "lora_jax/full"))
    add("lora_jax: LoRA / full step time", time_ratio("lora_jax/lora", "lora_jax/full"), "lora_over_full_time")
    add("PEFT/torch: LoRA / full step time (eager)", time_ratio("peft/eager", "torch/full-eager"))
    lora_mem = step_memory_mb(t["lora_jax/lora"]) if _ok(t.get("lora_jax/lora")) else None
    full_mem = step_memory_mb(t["lora_jax/full"]) if _ok(t.get("lora_jax/full")) else None
    add(
        "lora_jax: LoRA / full peak memory (training phase)",
        lora_mem / full_mem if lora_mem and full_mem else None,
        "lora_over_full_memory",
    )
    xla = [
        (t[k].get("xla_memory") or {}).get("peak_estimate_bytes") if _ok(t.get(k)) else None
        for k in ("lora_jax/lora", "lora_jax/full")
    ]
    add("lora_jax: LoRA / full XLA peak-memory estimate (args + temps)", xla[0] / xla[1] if all(xla) else None)
    remat = t.get("lora_jax/lora-remat")
    if _ok(remat):
        remat_mem = step_memory_mb(remat)
        add("lora_jax: LoRA with remat / full peak memory", remat_mem / full_mem if full_mem else None)
        add("lora_jax: LoRA with remat / full step time", time_ratio("lora_jax/lora-remat", "lora_jax/full"))
        add("lora_jax: LoRA with remat / LoRA step time", time_ratio("lora_jax/lora-remat", "lora_jax/lora"))
    if _ok(t.get("lora_jax/lora-nodropout")) and _ok(t.get("lora_jax/lora")):
        no_dropout = time_ratio("lora_jax/lora-nodropout", "lora_jax/lora")
        add("lora_jax: share of the LoRA step that dropout costs", 1 - no_dropout if no_dropout else None)
    for case in (results.get("infer") or {}).get("cases", []):
        # Best of the interleaved reps: a shared machine only ever slows a forward down, and merged params run
        # base's own executable, so any gap between their medians is the machine's, not the model's.
        v = case["variants"]
        label = f"{case['batch']}x{case['seq']}"
        add(f"inference {label}: merged / base latency (best of reps)", v["merged"]["min_s"] / v["base"]["min_s"],
            "merged_over_base")  # fmt: skip
        add(f"inference {label}: unmerged / base latency (best of reps)", v["unmerged"]["min_s"] / v["base"]["min_s"])
        add(f"inference {label}: merged / base latency (medians)", v["merged"]["median_s"] / v["base"]["median_s"])
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------


def matmul_ceiling(results: dict[str, Any], config: str) -> float | None:
    """The floor fraction a step would reach if everything but its matmuls were free: floor time / the time its
    own dot_generals take, each timed alone on this machine (jax_worker.time_matmuls_alone)."""
    r, peak = results["train"].get(config), machine_peak_flops(results)
    alone = (r or {}).get("matmuls_alone") if _ok(r) else None
    if not alone or not peak or not alone["sum_median_s"]:
        return None
    return results["flops"][method_of(config)]["total"] / peak / alone["sum_median_s"]


def _time_split(results: dict[str, Any]) -> list[str]:
    rows = []
    for name, r in results["train"].items():
        alone = r.get("matmuls_alone") if _ok(r) else None
        if not alone:
            continue
        step, dots = r["median_s"], alone["sum_median_s"]
        rows.append([name, _fmt(1e3 * step, ".1f"), f"{alone['dots']} ({alone['distinct']} distinct)",
                     _fmt(1e3 * dots, ".1f"), _fmt(alone["gflops"], ".1f"), _fmt(dots / step, ".2f"),
                     _fmt(1e3 * (step - dots), ".1f"), _fmt(matmul_ceiling(results, name), ".2f")])  # fmt: skip
    if not rows:
        return []
    header = ["config", "step ms", "dot_generals", "their time alone ms", "their GFLOP/s", "share of step",
              "rest ms", "floor fraction if the rest were free"]  # fmt: skip
    return [
        "## Where the step's time goes",
        "",
        *_table(header, rows),
        "Every dot_general of the step's jaxpr, jitted and timed alone at its own shape and dimension order (median "
        "of 7, less a jitted call's dispatch cost), times how often the step runs it. 'rest' is everything else: "
        "dropout bits, softmax, LayerNorm, GELU, the loss, AdamW, copies. The last column bounds the floor fraction "
        "this machine allows without faster matmuls.",
        "",
    ]


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return format(x, spec)
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines + [""]


def markdown(results: dict[str, Any]) -> str:
    m, machine = results["meta"], results["meta"]["machine"]
    gpu = m["gpu"]
    out = [
        f"# lora_jax vs PEFT + PyTorch: RoBERTa-{m['shape']}, batch {m['batch']} x seq {m['seq']}, "
        f"{m['dtype']}, {'GPU' if gpu else 'CPU'}",
        "",
        f"{m['date']} · lora_jax commit {m['git_commit']}"
        + (" · QUICK: few steps, not a measurement" if m["quick"] else ""),
        "",
    ]
    devices = ", ".join(sorted({str(v) for v in m.get("devices", {}).values() if v}))
    out += _table(
        ["machine", ""],
        [
            ["CPU", machine["cpu_model"]],
            ["cores (usable / logical)", f"{machine['usable_cores']} / {machine['logical_cores']}"],
            ["memory", f"{_fmt(machine['memory_gb'], '.1f')} GB"],
            ["devices", devices or "-"],
            ["versions", ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)],
            [
                "1-min load average before / after",
                f"{_fmt(m['load_before'], '.2f')} / {_fmt(m.get('load_after'), '.2f')}",
            ],
        ],
    )

    out += ["## Training step", ""]
    rows = []
    for name, r in results["train"].items():
        if not _ok(r):
            rows.append([name, (r or {}).get("skipped") or (r or {}).get("error") or "not run"] + [""] * 9)
            continue
        mem = r["memory"]
        rows.append(
            [
                name,
                _fmt(1e3 * r["median_s"], ".1f"),
                _fmt(1e3 * r["iqr_s"], ".1f"),
                _fmt(r["tokens_per_s"], ".0f"),
                _fmt(r["achieved_flops_per_s"] / 1e9, ".1f"),
                _fmt(r.get("mfu") if gpu else r.get("fraction_of_measured_peak"), ".2f"),
                _fmt(step_memory_mb(r), ".0f"),
                _fmt(mem.get("peak_rss_process_mb"), ".0f"),
                _fmt((r.get("xla_memory") or {}).get("peak_estimate_bytes", 0) / 2**20 or None, ".0f"),
                _fmt(r.get("compile_s"), ".1f"),
                f"{r['trainable_params']:,}",
            ]
        )
    peak_col = "MFU" if gpu else "fraction of floor"
    mem_col = "peak device MB (steps)" if gpu else "peak RSS MB (steps)"
    out += _table(
        [
            "config",
            "median ms",
            "IQR ms",
            "tokens/s",
            "GFLOP/s",
            peak_col,
            mem_col,
            "peak RSS MB (process)",
            "XLA peak estimate MB",
            "first step s",
            "trainable",
        ],
        rows,
    )

    out += ["## FLOPs per step", ""]
    rows = []
    for method in ("lora", "full"):
        f = results["flops"][method]
        r = results["train"].get(f"lora_jax/{method}") or {}
        xla = r.get("xla_flops")
        rows.append(
            [
                method,
                _fmt(f["forward"] / 1e9, ".2f"),
                _fmt(f["backward"] / 1e9, ".2f"),
                _fmt(f["total"] / 1e9, ".2f"),
                _fmt(f["skipped_weight_grads"] / 1e9, ".2f"),
                _fmt(r.get("jaxpr_matmul_flops", 0) / 1e9 if r.get("jaxpr_matmul_flops") else None, ".2f"),
                _fmt(xla / 1e9 if xla else None, ".2f"),
                _fmt(xla / f["total"] if xla else None, ".3f"),
            ]
        )
    out += _table(
        [
            "method",
            "analytic fwd GFLOP",
            "analytic bwd GFLOP",
            "analytic total",
            "frozen dW skipped",
            "jaxpr matmul GFLOP",
            "XLA cost_analysis GFLOP",
            "XLA / analytic",
        ],
        rows,
    )
    out += [
        "Analytic: matmuls only (formula in benchmarks/flops.py). jaxpr: every dot_general the step asks for, "
        "after dead-code elimination. XLA: cost_analysis() of the compiled step, elementwise ops included.",
        "",
    ]

    out += _time_split(results)
    out += ["## Matmul peak", ""]
    rows = [
        [k, "x".join(map(str, r["mkn"])) + f" {p['dtype']}", _fmt(r["gflops_best"], ".1f"),
         _fmt(r["gflops_median"], ".1f")]  # fmt: skip
        for k, p in results["peak"].items()
        if p and "gflops_best" in p
        for r in p.get("shapes", [])
    ]
    out += _table(["framework", "matmul (m x k x n)", "best GFLOP/s", "median GFLOP/s"], rows)
    out += [
        "The machine's peak (the floor's denominator) is the best rate of any of these: on a CPU the step's own "
        "feed-forward shapes, which fit the caches, can beat the large square product.",
        "",
    ]

    if results.get("infer") and results["infer"].get("cases"):
        out += ["## Inference latency (lora_jax, jitted forward, deterministic)", ""]
        rows = []
        for c in results["infer"]["cases"]:
            v = c["variants"]
            rows.append(
                [
                    f"{c['batch']} x {c['seq']}",
                    _fmt(1e3 * v["base"]["min_s"], ".2f"),
                    _fmt(1e3 * v["merged"]["min_s"], ".2f"),
                    _fmt(1e3 * v["unmerged"]["min_s"], ".2f"),
                    _fmt(v["merged"]["min_s"] / v["base"]["min_s"], ".3f"),
                    _fmt(v["unmerged"]["min_s"] / v["base"]["min_s"], ".3f"),
                    _fmt(v["merged"]["median_s"] / v["base"]["median_s"], ".3f"),
                    _fmt(c["merged_vs_unmerged_max_abs_logit_diff"], ".1e"),
                ]
            )
        out += _table(
            [
                "batch x seq",
                "base ms (best)",
                "merged ms (best)",
                "unmerged ms (best)",
                "merged/base",
                "unmerged/base",
                "merged/base (medians)",
                "max |logit| merged vs unmerged",
            ],
            rows,
        )
        n_cases, compiled = len(results["infer"]["cases"]), results["infer"].get("compilations")
        out += [
            f"Programs compiled: {_fmt(compiled)} for {n_cases} shapes x 3 variants; 2 per shape means the merged "
            "params ran base's own executable (same tree, shapes and dtypes), so merged = base up to noise. Times are "
            "the best of the interleaved reps (the reps' medians in the last ratio column).",
            "",
        ]

    out += ["## Ratios and the issue's targets", ""]
    if gpu:
        out += ["Targets are the issue's CPU targets, shown for reference.", ""]
    rows = [
        [r["name"], _fmt(r["value"], ".3f"), r["target"] or "-", {True: "PASS", False: "FAIL", None: "-"}[r["pass"]]]
        for r in results["ratios"]
    ]
    out += _table(["ratio", "value", "target", ""], rows)
    if results.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(out)


if __name__ == "__main__":  # re-render a results file: python benchmarks/report.py RESULTS.json
    import json
    import sys

    results = json.loads(open(sys.argv[1]).read())
    enrich(results)
    results["ratios"] = ratios(results)
    print(markdown(results))
