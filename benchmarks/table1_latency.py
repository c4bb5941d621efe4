"""The paper's Table 1: forward latency of a GPT-2-medium-shaped model (random weights) with and without adapters.

    python benchmarks/table1_latency.py [--settings 32x512,16x256,1x128] [--calls 20] [--rounds 5] [--quick]

Five variants of one model in one process: the base, LoRA merged (r=4 on W_q, W_v, Table 11's GPT-2 setting,
folded into the kernels: the base's program), LoRA unmerged, AdapterL and AdapterH. Each adapter's bottleneck r
is the one whose Section 5.1 count is nearest Table 1's |Θ| for that setting (0.5M, 11M, 11M). Rounds interleave
the variants in a new random order each time, so drift in the machine's load hits all of them alike; a round
times `calls` forwards of each, and the ratio to the base is taken within a round, then its median over rounds.
The GPT-2 backbone is timed without the LM head (`task="base"`): a 32 x 512 x 50257 float32 logit tensor alone
is 3.3 GB. Writes benchmarks/results/table1_latency-<time>.json and paper_tables/table1_latency.md, whose rows
are each setting's newest run on this device and model in --out, so `--settings 32x512` alone re-times one
setting and keeps the others (with `--quick`, a tiny model and shapes, both go under --out only: the test's run).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info  # noqa: E402
from lora_jax.bottleneck import adapter_layout, adapter_wrap, paper_adapter_count  # noqa: E402
from lora_jax.lora import lora_wrap, merge  # noqa: E402
from lora_jax.models import gpt2, hub  # noqa: E402

MEDIUM = dict(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024)
TINY = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
PAPER_SETTINGS = "32x512,16x256,1x128"
QUICK_SETTINGS = "2x16,1x8"
VARIANTS = ("base", "lora_merged", "lora_unmerged", "adapter_l", "adapter_h")


def _millions(text: str) -> float:
    return float(str(text).removesuffix("M")) * 1e6


def _relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def bottleneck_r(params: Any, method: str, d_model: int, budget: float) -> int:
    """The r whose paper count for `method` on these params is nearest `budget` trainable parameters."""
    adapters, norms = adapter_layout(adapter_wrap(params, method, hub.adapter_config("gpt2", r=1), jax.random.key(0)))
    return min(range(1, d_model + 1), key=lambda r: abs(paper_adapter_count(adapters, d_model, r, norms) - budget))


def variants(params: Any, d_model: int, budget: float) -> tuple[dict[str, Any], dict[str, int]]:
    """{variant: params} sharing the base's arrays, and the adapters' bottleneck r."""
    lora = lora_wrap(params, hub.lora_config("gpt2", ("q", "v"), r=4, alpha=32), jax.random.key(1))
    rs = {m: bottleneck_r(params, m, d_model, budget) for m in ("adapter_l", "adapter_h")}
    out = {"base": params, "lora_merged": merge(lora), "lora_unmerged": lora}
    for method, r in rs.items():
        out[method] = adapter_wrap(params, method, hub.adapter_config("gpt2", r=r), jax.random.key(2))
    return out, rs


def measure(config: gpt2.Config, batch: int, seq: int, budget: float, calls: int, rounds: int, seed: int = 0):
    module = gpt2.build(config, "base")
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq)), jnp.int32)
    params = module.init(jax.random.key(seed), ids[:1, :8])["params"]
    trees, rs = variants(params, config.n_embd, budget)
    forward = jax.jit(lambda p, x: module.apply({"params": p}, x, deterministic=True)["last_hidden_state"])
    for tree in trees.values():  # compile and warm every variant before any timing
        jax.block_until_ready(forward(tree, ids))
    times: dict[str, list[list[float]]] = {v: [] for v in trees}
    order = list(trees)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            round_times = []
            for _ in range(calls):
                t = time.perf_counter()
                jax.block_until_ready(forward(trees[name], ids))
                round_times.append(1e3 * (time.perf_counter() - t))
            times[name].append(round_times)
    base = [statistics.median(t) for t in times["base"]]
    result = {}
    for name, per_round in times.items():
        medians = [statistics.median(t) for t in per_round]
        flat = [x for t in per_round for x in t]
        result[name] = {
            "ms_median": statistics.median(flat),
            "ms_std": statistics.pstdev(flat),
            "ratio_to_base": statistics.median(m / b for m, b in zip(medians, base, strict=True)),
            "round_medians_ms": medians,
        }
    return {"batch": batch, "seq": seq, "budget": budget, "adapter_r": rs, "variants": result}


def newest_per_setting(run: dict[str, Any], out: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(run, setting) for every batch x seq timed on this run's device and model: this run's own, else the newest
    earlier JSON's in `out`, so one slow setting (32 x 512) need not be re-timed with the others."""
    newest: dict[tuple[int, int], tuple[dict[str, Any], dict[str, Any]]] = {}
    for path in sorted(out.glob("table1_latency-*.json")):  # names carry the time: oldest first, newer ones win
        earlier = json.loads(path.read_text())
        if (earlier["device"], earlier["model"]) == (run["device"], run["model"]):
            newest.update({(s["batch"], s["seq"]): (earlier, s) for s in earlier["settings"]})
    newest.update({(s["batch"], s["seq"]): (run, s) for s in run["settings"]})
    return sorted(newest.values(), key=lambda rs: -rs[1]["batch"] * rs[1]["seq"])


def table(rows: list[tuple[dict[str, Any], dict[str, Any]]], paper: dict[str, Any]) -> str:
    """The markdown table of (run, setting) pairs, each setting's run (machine, load, repeats, JSON) named."""
    by_setting = {(s["batch"], s["seq"]): s for s in paper["settings"]}
    runs: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for run, s in rows:
        runs.setdefault(run["json"], (run, []))[1].append(f"{s['batch']} x {s['seq']}")
    model, device = rows[0][0]["model"], rows[0][0]["device"]
    lines = [
        "# Table 1 analogue: forward latency with and without adapters (generated by benchmarks/table1_latency.py)",
        "",
        f"Ours: {model} with random weights, float32, backbone without the LM head, on {device}; median ms of the",
        "forwards below, the variants interleaved in each round, ratio to the base taken per round. LoRA: r=4 on",
        "W_q, W_v. Each setting comes from the newest run that timed it:",
        "",
    ]
    for path, (run, settings) in runs.items():
        m = run["machine"]
        lines.append(
            f"- {', '.join(settings)}: {run['calls']} forwards x {run['rounds']} rounds, {m['cpu_model']}, "
            f"{m['usable_cores']} usable cores, load {m['load_average_1m']:.2f} at the start; JSON: {path}."
        )
    lines += [
        "",
        "Paper: Table 1 of arXiv:2106.09685 v2 (GPT-2 medium, one forward pass, ms averaged over 100 trials, NVIDIA",
        "Quadro RTX8000).",
        "",
        "| batch x seq | |Θ| (paper) | variant | r | ours ms | ours vs base | paper ms | paper vs base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    paper_key = {"base": "base", "lora_merged": "base", "adapter_l": "adapter_l", "adapter_h": "adapter_h"}
    for _, s in rows:
        p = by_setting.get((s["batch"], s["seq"]))
        for name, v in s["variants"].items():
            key = paper_key.get(name)
            paper_ms = f"{p[key]} ± {p[key + '_pm']}" if p and key else "—"
            paper_pct = f"+{p[key + '_pct']}%" if p and key in ("adapter_l", "adapter_h") else "0 (same row)" if (
                p and key) else "—"  # fmt: skip
            r = s["adapter_r"].get(name, 4 if name.startswith("lora") else "")
            lines.append(
                f"| {s['batch']} x {s['seq']} | {p['params'] if p else '—'} | {name} | {r} | {v['ms_median']:.2f} ± "
                f"{v['ms_std']:.2f} | {100 * (v['ratio_to_base'] - 1):+.1f}% | {paper_ms} | {paper_pct} |"
            )
    lines += ["", "The paper prints one Fine-Tune/LoRA row: merged LoRA runs the base model's program."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default=None, help="batch x seq, comma-separated (default: the paper's three)")
    p.add_argument("--calls", type=int, default=20, help="timed forwards per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny model and shapes (the test's smoke run)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--table", default=None, help="markdown path; default paper_tables/table1_latency.md")
    args = p.parse_args(argv)
    paper = yaml.safe_load((ROOT / "paper_tables" / "paper_numbers.yaml").read_text())["table1"]
    budgets = {(s["batch"], s["seq"]): _millions(s["params"]) for s in paper["settings"]}
    chosen = args.settings or (QUICK_SETTINGS if args.quick else PAPER_SETTINGS)
    settings = [tuple(int(n) for n in s.split("x")) for s in chosen.split(",")]
    config = gpt2.Config(**(TINY if args.quick else MEDIUM))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    while (out / f"table1_latency-{stamp}.json").exists():  # names order the runs: never two in one second
        time.sleep(1)
        stamp = time.strftime("%Y%m%d-%H%M%S")
    run = {
        "model": "tiny GPT-2 (quick)" if args.quick else "GPT-2 medium shape (1024 x 24 layers, 16 heads)",
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "machine": machine_info(),
        "calls": 3 if args.quick else args.calls,
        "rounds": 2 if args.quick else args.rounds,
        "json": _relative(out / f"table1_latency-{stamp}.json"),
        "settings": [],
    }
    for batch, seq in settings:
        budget = 2e4 if args.quick else budgets.get((batch, seq), _millions("11M"))
        run["settings"].append(measure(config, batch, seq, budget, run["calls"], run["rounds"]))
        last = run["settings"][-1]
        ratios = {n: round(v["ratio_to_base"], 4) for n, v in last["variants"].items()}
        print(json.dumps({k: v for k, v in last.items() if k != "variants"} | ratios))
    (out / f"table1_latency-{stamp}.json").write_text(json.dumps(run, indent=2))
    table_path = (
        Path(args.table) if args.table else (out if args.quick else ROOT / "paper_tables") / "table1_latency.md"
    )
    table_path.write_text(table(newest_per_setting(run, out), paper))
    print(f"wrote {out / f'table1_latency-{stamp}.json'} and {table_path}")
    return run


if __name__ == "__main__":
    main()
