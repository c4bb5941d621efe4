"""The baselines' trainable-parameter counts (Tables 2, 3, 4 and 15 of the paper) from model configs, beside the
printed ones: `paper_tables/param_counts.md`, written by experiments/tables.py.

Every count is traced with jax.eval_shape (GPT-3 175B included: nothing is allocated) and compared with Section
5.1's formula and with the print. Where the paper does not state r, the table lists every r whose count prints as
the paper's number. Prefix methods: `OUR_COUNTS[method] = fn(config, row) -> int` adds our count for them; their
formula column is filled from `bottleneck.paper_prefix_count` either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import jax
import numpy as np

from lora_jax.bottleneck import (
    ADAPTER_METHODS,
    FT_TOP2,
    adapter_layout,
    adapter_wrap,
    is_adapter_leaf,
    layer_of,
    norm_modules,
    paper_adapter_count,
    paper_prefix_count,
    top_layers,
)
from lora_jax.methods import count_params
from lora_jax.models import hub
from lora_jax.models.spec import config_from_hf, param_shapes, unflatten
from lora_jax.tree import leaf_paths

# config.json fields of the checkpoints the paper adapted (the hub configs), and GPT-3 175B's shape as a GPT-2.
MODELS: dict[str, dict[str, Any]] = {
    "roberta_base": {"model_type": "roberta", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                     "intermediate_size": 3072, "vocab_size": 50265, "max_position_embeddings": 514,
                     "type_vocab_size": 1, "pad_token_id": 1},
    "roberta_large": {"model_type": "roberta", "hidden_size": 1024, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "intermediate_size": 4096, "vocab_size": 50265,
                      "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1},
    "gpt2_medium": {"model_type": "gpt2", "n_embd": 1024, "n_layer": 24, "n_head": 16},
    "gpt2_large": {"model_type": "gpt2", "n_embd": 1280, "n_layer": 36, "n_head": 20},
    "gpt3_175b": {"model_type": "gpt2", "n_embd": 12288, "n_layer": 96, "n_head": 96, "n_positions": 2048},
}  # fmt: skip
OUR_COUNTS: dict[str, Callable[[Any, Mapping[str, Any]], int]] = {}  # method -> our count, for methods added later


@dataclasses.dataclass(frozen=True)
class Count:
    row: Mapping[str, Any]
    r: str  # the r used ("64"), or the r that reproduce the print ("6 (5–7 print so)")
    layout: str  # L̂_Adpt / L̂_LN
    formula: int | None
    ours: int | None
    also_trained: int  # leaves beyond the method's own that train with it (adapter_h: the model's LayerNorms)
    note: str


def model_config(name: str) -> Any:
    return config_from_hf(MODELS[name], "base")


def shapes(name: str) -> dict[str, Any]:
    """The base model's param tree as ShapeDtypeStructs: traced once per config, never allocated."""
    return unflatten(param_shapes(model_config(name), "base"))


def prints_as(count: int, printed: str) -> bool:
    """Whether `count` rounds to the paper's "0.37M" (to as many decimals as it prints)."""
    value = Decimal(printed.strip().removesuffix("M").strip())
    return round(Decimal(count) / Decimal(10**6), -value.as_tuple().exponent) == value


def wrapped_shapes(name: str, method: str, r: int, drop_first: int = 5) -> Any:
    config = hub.adapter_config(MODELS[name]["model_type"], r=r, drop_first=drop_first)
    return jax.eval_shape(lambda p: adapter_wrap(p, method, config, jax.random.key(0)), shapes(name))


def adapter_count(name: str, method: str, r: int) -> tuple[int, int, int, int]:
    """(L̂_Adpt, L̂_LN, our adapter leaves, other leaves that train with them) for `method` at bottleneck r."""
    tree = wrapped_shapes(name, method, r)
    ours = sum(int(np.prod(x.shape)) for p, x in leaf_paths(tree) if is_adapter_leaf(p))
    return *adapter_layout(tree), ours, count_params(tree, None, method).trainable - ours


def d_model(name: str) -> int:
    config = model_config(name)
    return config.n_embd if hasattr(config, "n_embd") else config.hidden_size


def _millions(printed: str) -> float:
    return float(printed.strip().removesuffix("M")) * 1e6


def _adapter_row(row: Mapping[str, Any]) -> Count:
    name, method, d = row["model"], row["method"], d_model(row["model"])
    adapters, norms, _, _ = adapter_count(name, method, 1)  # the layout does not depend on r
    formula_at = lambda r: paper_adapter_count(adapters, d, r, norms)  # noqa: E731
    if row.get("r") is not None:
        r, r_text = int(row["r"]), f"{row['r']} ({row['source']})"
    else:
        fits = [r for r in range(1, d + 1) if prints_as(formula_at(r), row["printed"])]
        r = min(range(1, d + 1), key=lambda r: abs(formula_at(r) - _millions(row["printed"])))
        r_text = f"not stated; {_span(fits)} print so" if fits else f"not stated; none prints so (nearest {r})"
    _, _, ours, also = adapter_count(name, method, r)
    formula = formula_at(r)
    notes = []
    if method == "adapter_d":
        notes.append("our adapter_d drops the lowest 5 layers (AdapterDrop's setting); the paper does not say")
    if also:
        notes.append(f"+{also:,} of the model's LayerNorms train with Houlsby adapters; the print leaves them out")
    if not prints_as(ours, row["printed"]):
        notes.append("the count at the stated r does not print as the paper's number")
    return Count(row, r_text, f"{adapters} / {norms}", formula, ours, also, "; ".join(notes))


def _span(rs: list[int]) -> str:
    return f"r={rs[0]}" if len(rs) == 1 else f"r={rs[0]}–{rs[-1]}"


def _ft_top2_row(row: Mapping[str, Any]) -> Count:
    tree = shapes(row["model"])
    ours = count_params(tree, None, FT_TOP2).trainable
    top, norms = top_layers(tree, 2), norm_modules(tree)
    in_norms = sum(int(np.prod(x.shape)) for p, x in leaf_paths(tree)
                   if layer_of(p) in top and p.rsplit(".", 1)[0] in norms)  # fmt: skip
    depth = len({i for _, i in top})
    if prints_as(ours, row["printed"]):
        note = (
            f"the last {depth} layers whole (weights, biases, LayerNorms): {depth} × {ours // depth:,}. "
            "microsoft/LoRA issue 148 asks how the print arises and has no answer; this count reproduces it"
        )
    else:
        note = (f"the last {depth} layers whole do not print so; without their {in_norms:,} LayerNorm entries: "
                f"{ours - in_norms:,}")  # fmt: skip
    return Count(row, "—", "—", None, ours, 0, note)


def _prefix_row(row: Mapping[str, Any]) -> Count:
    config = model_config(row["model"])
    if "l_p" not in row:
        return Count(row, "—", "—", None, None, 0, "l_p and l_i not stated in the paper")
    formula = paper_prefix_count(row["method"], config.n_embd, config.n_layer, row["l_p"], row["l_i"])
    ours = OUR_COUNTS[row["method"]](config, row) if row["method"] in OUR_COUNTS else None
    note = f"l_p={row['l_p']}, l_i={row['l_i']} ({row['source']})"
    if not prints_as(formula, row["printed"]):
        note += "; the paper's own formula does not print as its number"
    return Count(row, "—", "—", formula, ours, 0, note)


def count_row(row: Mapping[str, Any]) -> Count:
    if row["method"] in ADAPTER_METHODS:
        return _adapter_row(row)
    if row["method"] == FT_TOP2:
        return _ft_top2_row(row)
    return _prefix_row(row)


def _num(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def param_counts_table(rows: list[Mapping[str, Any]]) -> str:
    lines = [
        "# Trainable parameters of the paper's baselines (generated by `python experiments/tables.py`)",
        "",
        "Our counts are traced from the model configs with `jax.eval_shape` (nothing allocated) after",
        "`bottleneck.adapter_wrap` (or `trainable_mask` for FT-Top2); the formula is Section 5.1's",
        "|Θ| = L̂_Adpt·(2·d_model·r + r + d_model) + 2·L̂_LN·d_model (PreEmbed d_model·(l_p+l_i), PreLayer",
        "L·d_model·(l_p+l_i)); printed numbers from paper_tables/paper_numbers.yaml (`param_counts`). Heads are not",
        "counted, as in the paper. ✓: our count prints as the paper's number.",
        "",
        "| table | model | method | r | L̂_Adpt / L̂_LN | formula | ours (eval_shape) | printed | | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in map(count_row, rows):
        row = c.row
        ok = "✓" if c.ours is not None and prints_as(c.ours, row["printed"]) else "✗" if c.ours is not None else ""
        lines.append(f"| {row['table']} | {row['model']} | {row['method']} | {c.r} | {c.layout} | {_num(c.formula)} | "
                     f"{_num(c.ours)} | {row['printed']} | {ok} | {c.note} |")  # fmt: skip
    return "\n".join(lines) + "\n"
