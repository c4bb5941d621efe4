"""Which leaves train under each method, the optimizer that freezes the rest, and parameter counts.

`trainable_mask` is the one place that decides what trains, for LoRA and for every baseline the trainer offers
(full fine-tuning, BitFit, bottleneck adapters, FT-Top2, prefix tuning); `partition` splits params by it so the
step differentiates the trainable half only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax

from lora_jax.bottleneck import ADAPTER_METHODS, DESIGNS, FT_TOP2, is_adapter_leaf, layer_of, norm_modules, top_layers
from lora_jax.lora import BOOKKEEPING, LORA_A, LORA_PREFIX, LoraConfig, LoraError
from lora_jax.prefix import PREFIX_METHODS, is_prefix_leaf
from lora_jax.quant import is_quantized
from lora_jax.tree import Params, is_path_leaf, leaf_paths, map_with_path, matches_leaf

METHODS = ("lora", "full", "bitfit", *ADAPTER_METHODS, FT_TOP2, *PREFIX_METHODS)  # lora_jax.bottleneck, .prefix


# ---------------------------------------------------------------------------------------------------------------
# Which leaves train
# ---------------------------------------------------------------------------------------------------------------


def trainable_mask(params: Params, config: LoraConfig | None = None, method: str = "lora") -> Any:
    """A bool pytree: True for the leaves that train. The one place that decides it, for every method:

    "lora": LoRA A/B, `config.train_also`, biases per `config.bias`; "full": every weight (the paper's FT baseline);
    "bitfit": every bias and `config.train_also`; "adapter_h/l/p/d": the adapter leaves (`bottleneck.adapter_wrap`),
    `config.train_also`, and for adapter_h the model's LayerNorms; "ft_top2": the last two layers of each stack and
    `config.train_also`; "prefix_embed"/"prefix_layer"/"prefix_kv": the prefix leaves (lora_jax.prefix),
    `config.train_also` and biases per `config.bias`. LoRA's bookkeeping leaves (scale, slice, dropout) never
    train, and under the other methods neither do LoRA A/B (the params are not meant to carry them there); adapter
    leaves train only under their methods.
    """
    if method not in METHODS:
        raise LoraError(f"method must be one of {list(METHODS)}, got {method!r}.")
    adapted = {p.rsplit(".", 1)[0] for p, _ in leaf_paths(params) if p.rsplit(".", 1)[-1].startswith(LORA_A)}
    also = config.train_also if config is not None else ()
    norms = norm_modules(params) if method in DESIGNS and DESIGNS[method].train_norms else set()
    top = top_layers(params, 2) if method == FT_TOP2 else set()

    def trains(path: str) -> bool:
        name = path.rsplit(".", 1)[-1]
        if name.startswith(LORA_PREFIX):
            return method == "lora" and not name.startswith(BOOKKEEPING)
        if is_adapter_leaf(path):
            return method in DESIGNS
        if is_prefix_leaf(path):
            return method in (*PREFIX_METHODS, "full")
        if method == "full":
            return True
        if any(matches_leaf(p, path) for p in also):
            return True
        if method in DESIGNS:
            return path.rsplit(".", 1)[0] in norms
        if method == FT_TOP2:
            return layer_of(path) in top
        if name != "bias":
            return False
        if method == "bitfit":
            return True
        bias = config.bias if config is not None else "none"
        return bias == "all" or (bias == "lora_only" and path.rsplit(".", 1)[0] in adapted)

    return map_with_path(lambda path, _: trains(path), params)


def partition(params: Params, mask: Any) -> tuple[Any, Any]:
    """Split params into (trainable, frozen) trees with `None` in the other's places.

    Differentiating a loss with respect to the trainable half only means XLA never computes the gradients of
    frozen weights (the dW = x^T dy products), which is most of LoRA's saving. A quantized kernel is one leaf
    here and is always frozen.
    """
    for (path, leaf), (_, trains) in zip(leaf_paths(params), leaf_paths(mask), strict=True):
        if trains is True and is_quantized(leaf):
            raise LoraError(
                f"{path} is quantized and cannot train; keep it frozen (drop it from train_also / method) or "
                "dequantize it first (quant.dequantize_params)."
            )
    trainable = jax.tree.map(lambda p, m: p if m is True else None, params, mask, is_leaf=is_path_leaf)
    frozen = jax.tree.map(lambda p, m: None if m is True else p, params, mask, is_leaf=is_path_leaf)
    return trainable, frozen


def unpartition(trainable: Any, frozen: Any) -> Any:
    """Inverse of `partition`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def lora_optimizer(
    tx: optax.GradientTransformation, params: Params, config: LoraConfig | None = None, method: str = "lora"
) -> optax.GradientTransformation:
    """`tx` on the trainable leaves, `set_to_zero` on the rest, so frozen leaves never change and carry no state."""
    labels = jax.tree.map(lambda m: "train" if m else "freeze", trainable_mask(params, config, method))
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


# ---------------------------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def count_params(params: Params, config: LoraConfig | None = None, method: str = "lora") -> ParamCount:
    """Trainable and total parameter counts (LoRA scales are bookkeeping, not parameters)."""
    mask = trainable_mask(params, config, method)
    trainable = total = 0
    for (path, leaf), (_, m) in zip(leaf_paths(params), leaf_paths(mask), strict=True):
        name = path.rsplit(".", 1)[-1]
        if name.startswith(BOOKKEEPING):
            continue
        n = int(np.prod(np.shape(leaf)))
        total += n
        trainable += n if m else 0
    return ParamCount(trainable, total)
