"""The tables of a benchmarks/quant.py results file: each configuration's numbers, and the issue's targets.
`python -m benchmarks.report_quant benchmarks/results/quant-<...>.json` prints them and rewrites the .md beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# (name, what, numerator config, denominator config, field, "<=" or ">=", bound)
TARGETS = (
    ("nf4 base weights / fp32 base weights", "lora_jax/nf4", "lora_jax/fp32", "frozen_base_mb", "<=", 0.3),
    ("nf4 step / fp32 step", "lora_jax/nf4", "lora_jax/fp32", "median_s", "<=", 1.5),
    ("nf4 base weights, token table nf4 too / fp32 base weights", "lora_jax/nf4+table", "lora_jax/fp32",
     "frozen_base_mb", "<=", 0.3),
    ("nf4+table step / fp32 step", "lora_jax/nf4+table", "lora_jax/fp32", "median_s", "<=", 1.5),
    ("PEFT+torch fp32 step / lora_jax fp32 step", "peft/fp32", "lora_jax/fp32", "median_s", ">=", 1.3),
    ("Qwix LoRA step / lora_jax fp32 step", "qwix/lora-fp32", "lora_jax/fp32", "median_s", ">=", 1.0),
    ("lora_jax fp32 peak RSS / Qwix LoRA's", "lora_jax/fp32", "qwix/lora-fp32", "peak_rss_training_mb", "<=", 1.0),
    ("Qwix QLoRA-nf4 step / lora_jax nf4 step", "qwix/qlora-nf4", "lora_jax/nf4", "median_s", ">=", 1.0),
    ("lora_jax nf4 peak RSS / Qwix QLoRA-nf4's", "lora_jax/nf4", "qwix/qlora-nf4", "peak_rss_training_mb", "<=", 1.0),
    ("lora_jax nf4 base weights / Qwix nf4's", "lora_jax/nf4", "qwix/qlora-nf4", "frozen_base_mb", "<=", 1.0),
)


def _fmt(value: Any, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, num, den, field, op, bound in TARGETS:
        a, b = (results.get(c, {}).get(field) for c in (num, den))
        value = a / b if a is not None and b else None
        ok = None if value is None else (value <= bound if op == "<=" else value >= bound)
        rows.append({"target": name, "value": value, "bound": f"{op} {bound}", "pass": ok})
    return rows


def markdown(report: dict[str, Any]) -> str:
    meta, results = report["meta"], report["results"]
    machine = meta["machine"]
    lines = [
        f"# QLoRA step on CPU: {meta['model']}, batch {meta['batch']} x {meta['seq']}, LoRA r={meta['rank']} "
        f"alpha={meta['alpha']} on {', '.join(meta['targets'])}",
        "",
        f"{machine['cpu_model']}, {machine['usable_cores']} cores; git {meta['git_commit']}; {meta['date']}; "
        f"{meta['warmup']} warm-up + {meta['steps']} timed steps; 1-min load average {meta['load_before']:.2f} at "
        f"the start, {meta['load_after']:.2f} at the end" + (" (--quick: measures nothing)" if meta["quick"] else ""),
        "",
        "| config | step, median (s) | tokens/s | first step (s) | peak RSS, timed steps (MB) | frozen base (MB) | "
        "trainable params | XLA step estimate (MB) | first loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "median_s" not in r:
            reason = r.get("skipped") or r.get("error") or "no result"
            lines.append(f"| {name} | not measured: {reason} | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['median_s']:.3f} | {r['tokens_per_s']:.0f} | {r['first_step_s']:.1f} | "
            f"{_fmt(r.get('peak_rss_training_mb'))} | {r['frozen_base_mb']:.1f} | {r['trainable_params']:,} | "
            f"{_fmt(r.get('xla_step_estimate_mb'))} | {r['losses'][0]:.4f} |"
        )
    lines += ["", "| target | value | bound | pass |", "|---|---|---|---|"]
    for row in ratios(results):
        verdict = {True: "yes", False: "**no**", None: "-"}[row["pass"]]
        lines.append(f"| {row['target']} | {_fmt(row['value'], '.2f')} | {row['bound']} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    path = Path((argv or sys.argv[1:])[0])
    text = markdown(json.loads(path.read_text()))
    path.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
