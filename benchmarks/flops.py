"""How many matmul FLOPs one RoBERTa training step needs, counted by hand and counted in the program JAX emits.

Convention (as in MFU): only matrix products count, 2 FLOPs per multiply-add. LayerNorm, softmax, GELU, dropout,
the loss and AdamW are elementwise: memory-bound, and a few percent of the total at these sizes; XLA's own
`cost_analysis()` counts them too, which is why the benchmark reports it beside these numbers.

Notation: N = batch * seq tokens, T = seq, d = hidden, f = ffn width, r = LoRA rank, C = labels, L = layers.

Forward, per layer:
    q, k, v, o projections    4 * 2 N d d   = 8 N d^2
    ffn up and down           2 * 2 N d f   = 4 N d f
    scores Q K^T, probs V     2 * 2 N T d   = 4 N T d      (summed over heads: T x T per head of width d/h)
    LoRA on q and v           2 * (2 N d r + 2 N r d) = 8 N d r     (x A, then (x A) B)
Head (RoBERTa's, on the <s> token only): 2 B d d + 2 B d C.  Embeddings are gathers: 0 FLOPs.

Backward. Each product Y = X W costs two more of its size: dX = dY W^T (needed when anything below X trains) and
dW = X^T dY (needed when W trains). Attention's products have two activation operands; each needs its gradient
when anything below it trains.
  full FT: everything trains, the embeddings too, so every dX and every dW is computed: backward = 2 x forward.
  LoRA:    no frozen weight's dW is computed -- that is  L * (8 N d^2 + 4 N d f)  of the full step's FLOPs gone,
           about a third of the step. What remains:
             every dX (gradients must flow down to the lowest adapter): 8 N d^2 + 4 N d f per layer
             attention: both operand gradients, 8 N T d per layer
             per adapter: dB = (xA)^T dY, d(xA) = dY B^T, dA = x^T d(xA), dx = d(xA) A^T: 8 N d r
           except in layer 0, whose input (the embedding output) depends on nothing trainable, so JAX never
           forms its gradient: no dX through W_q, W_k, W_v (6 N d^2), no dK (2 N T d, K feeds only the scores
           and k has no adapter), no dx through the two adapters' A (4 N d r).
           The head trains (`train_also: classifier`): its dW and dX, 2 x its forward.
So a LoRA step is forward + about one more forward (the dX half of the backward): about 2/3 of a full step's FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int = 50265
    max_positions: int = 514
    num_labels: int = 2

    def hf_config(self) -> dict[str, Any]:
        """Fields for transformers.RobertaConfig (everything else: its defaults, dropout 0.1 included)."""
        return {
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "intermediate_size": self.ffn,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.max_positions,
            "num_labels": self.num_labels,
        }


SHAPES = {
    "tiny": Shape(hidden=64, layers=2, heads=4, ffn=256, vocab=1000),
    "base": Shape(hidden=768, layers=12, heads=12, ffn=3072),  # RobertaConfig defaults
    "large": Shape(hidden=1024, layers=24, heads=16, ffn=4096),
}

LORA_MODULES = ("q", "v")  # what the benchmark adapts: the paper's GLUE setting


def forward_flops(s: Shape, batch: int, seq: int, lora_rank: int = 0) -> dict[str, float]:
    n, d, f, t, r = batch * seq, s.hidden, s.ffn, seq, lora_rank
    return {
        "projections": s.layers * 8 * n * d * d,
        "ffn": s.layers * 4 * n * d * f,
        "attention": s.layers * 4 * n * t * d,
        "lora": s.layers * len(LORA_MODULES) * 4 * n * d * r,
        "head": 2 * batch * d * d + 2 * batch * d * s.num_labels,
    }


def train_step_flops(s: Shape, batch: int, seq: int, method: str, lora_rank: int = 8) -> dict[str, float]:
    """{"forward", "backward", "total", "skipped_weight_grads", ...}: the breakdown in the module docstring."""
    n, d, f, t = batch * seq, s.hidden, s.ffn, seq
    if method == "full":
        fwd = forward_flops(s, batch, seq)
        forward = sum(fwd.values())
        return {"forward": forward, "backward": 2 * forward, "total": 3 * forward, "skipped_weight_grads": 0}
    if method != "lora":
        raise ValueError(f"method must be 'lora' or 'full', got {method!r}.")
    r, adapters = lora_rank, len(LORA_MODULES)
    fwd = forward_flops(s, batch, seq, lora_rank)
    forward = sum(fwd.values())
    per_layer = (8 * n * d * d + 4 * n * d * f) + 8 * n * t * d + adapters * 8 * n * d * r
    layer0_skips = 6 * n * d * d + 2 * n * t * d + adapters * 2 * n * d * r
    backward = s.layers * per_layer - layer0_skips + 2 * fwd["head"]
    return {
        "forward": forward,
        "backward": backward,
        "total": forward + backward,
        "skipped_weight_grads": s.layers * (8 * n * d * d + 4 * n * d * f),
        "skipped_layer0_input_grads": layer0_skips,
    }


def inference_flops(s: Shape, batch: int, seq: int, lora_rank: int = 0) -> float:
    return float(sum(forward_flops(s, batch, seq, lora_rank).values()))


# ---------------------------------------------------------------------------------------------------------------
# What the program asks for: dot_general FLOPs in a jaxpr (after dead-code elimination, as XLA would)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Matmul:
    """One dot_general the step runs, as it can be rebuilt and timed alone (benchmarks/jax_worker.py)."""

    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    dtype: str
    dimension_numbers: Any  # ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)), as lax.dot_general takes it
    flops: float


def jaxpr_matmuls(closed_jaxpr: Any) -> Counter[Matmul]:
    """Every dot_general in a jaxpr, sub-jaxprs included, with how often each occurs.

    Dead code is dropped first (jax.make_jaxpr keeps e.g. forward values nobody reads), so frozen-weight
    gradients show up here only if the step really computes them."""
    from jax.extend.core import subjaxprs

    found: Counter[Matmul] = Counter()

    def visit(jx) -> None:
        for eqn in jx.eqns:
            if eqn.primitive.name == "dot_general":
                dims = eqn.params["dimension_numbers"]
                lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
                contracted = math.prod(lhs.shape[axis] for axis in dims[0][0])
                out = math.prod(eqn.outvars[0].aval.shape)
                frozen_dims = tuple(tuple(tuple(int(a) for a in axes) for axes in pair) for pair in dims)
                key = Matmul(tuple(lhs.shape), tuple(rhs.shape), str(lhs.dtype), frozen_dims, 2.0 * out * contracted)
                found[key] += 1
        for sub in subjaxprs(jx):
            visit(sub)

    visit(_dce(closed_jaxpr.jaxpr))
    return found


def jaxpr_matmul_flops(closed_jaxpr: Any) -> float:
    """2 * (output elements) * (contracted size), summed over every dot_general the step runs."""
    return sum(m.flops * count for m, count in jaxpr_matmuls(closed_jaxpr).items())


def _dce(jaxpr: Any) -> Any:
    try:  # private, but the only DCE JAX has; without it the count includes dead code (an upper bound)
        from jax._src.interpreters import partial_eval as pe

        return pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[0]
    except Exception:  # noqa: BLE001
        return jaxpr
