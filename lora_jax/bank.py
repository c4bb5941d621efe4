"""An adapter bank: many named LoRA adapters on one frozen base, stacked so one compiled program serves them all.

Each adapted kernel's adapters are held as stacked leaves beside nothing else of the model:

    lora_a: (slots, d_in, r_max)    lora_b: (slots, r_max, d_out)    lora_scale: (slots,)

An adapter of rank r < r_max fills its first r columns of A and rows of B and leaves the rest zero (that is the
rank mask: a zero column times a zero row adds exactly nothing); an adapter that does not target a kernel has
scale 0 there. Because a slot is an index into these arrays, a jitted forward that takes (base, stack, slot)
compiles once: switching the active adapter changes an integer, and adding an adapter that fits the layout
(its targets among the stacked kernels, its ranks <= r_max, a free slot) writes one slot, O(capacity x adapter)
work and never O(model). An adapter that does not fit re-lays the stack out (more slots, a larger r_max or a new
kernel), and the next call compiles once for the new shapes.

Mixed batches: `route` gathers each row's A, B and scale (scale 0 for id -1, the bare base), giving LoRA leaves
with a leading batch axis that `layers.Dense` applies row by row (a batched einsum). Gathering copies
(d_in + d_out) x r_max per row and kernel, which is below the activations' own (tokens x d) once a row holds
r_max or more tokens, and costs no sort or regrouping of rows. `route_grouped` instead sorts rows into adapter
groups and applies each adapter once to its group (`jax.lax.ragged_dot`); `mixed_apply` picks between them by
shape and backend (see there). Mixed batches share the base's non-LoRA leaves: an adapter's own head
(`train_also`) is used by `base_for`, i.e. when that one adapter is active. Both need every adapted Dense to see
inputs with the batch axis first, so DeBERTa with share_att_key (its key/query kernels also project the
relative-position table) cannot take mixed batches.

The bank itself is a small immutable container; every operation returns a new one and the functions that run
under jit (`select`, `route`) are pure over (base, stack, ids).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import lora
from lora_jax.layers import LORA_GROUPS
from lora_jax.lora import LORA_A, LORA_B, LORA_SCALE, LORA_SLICE, LoraError, is_lora_leaf
from lora_jax.tree import Params, combine, filter_leaves, leaf_paths

GROUPED_FROM = 128  # tokens per row from which mixed_apply groups rows by adapter instead of gathering per row
Target = tuple[str, str]  # (module path, slice suffix: '' or '_q')


@dataclasses.dataclass(frozen=True)
class AdapterBank:
    """Named adapters for one base. `slots[i]` names the adapter in slot i (None: free)."""

    base: Params  # the frozen params, no LoRA leaves
    stack: Params  # nested like the params: {module: {lora_a{s}, lora_b{s}, lora_scale{s}[, lora_slice{s}]}}
    slots: tuple[str | None, ...]
    ranks: Mapping[str, Mapping[Target, int]]  # adapter -> {target: its true rank}
    extras: Mapping[str, Params]  # adapter -> its non-LoRA leaves (a head trained alongside, biases)
    r_max: int
    active: str | None = None

    @property
    def names(self) -> list[str]:
        return [n for n in self.slots if n is not None]

    def stack_leaf(self, module: str, leaf: str) -> jax.Array:
        return _get(self.stack, f"{module}.{leaf}")

    def slot(self, name: str) -> int:
        if name not in self.slots:
            raise LoraError(f"No adapter {name!r} in the bank; it holds {self.names}.")
        return self.slots.index(name)


def new_bank(base_params: Params, capacity: int = 4, r_max: int = 8) -> AdapterBank:
    """An empty bank for `base_params`; the stack grows (once per new layout) as adapters are added."""
    if any(is_lora_leaf(p) for p, _ in leaf_paths(base_params)):
        raise LoraError("The bank's base must carry no LoRA leaves; pass strip_lora(params) (or merge first).")
    return AdapterBank(dict(base_params), {}, (None,) * capacity, {}, {}, r_max)


def targets_of(adapter: Params) -> dict[Target, dict[str, Any]]:
    """{(module path, suffix): {'a', 'b', 'scale'[, 'slice']}} of an adapter (or adapted params) tree."""
    found: dict[Target, dict[str, Any]] = {}
    for path, leaf in leaf_paths(filter_leaves(adapter, is_lora_leaf)):
        module, name = path.rsplit(".", 1)
        for kind, prefix in (("a", LORA_A), ("b", LORA_B), ("scale", LORA_SCALE), ("slice", LORA_SLICE)):
            if name.startswith(prefix):
                found.setdefault((module, name[len(prefix) :]), {})[kind] = leaf
    return found


def _get(tree: Params, module: str) -> Any:
    for name in module.split("."):
        tree = tree.get(name) if isinstance(tree, Mapping) else None
        if tree is None:
            return None
    return tree


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{dotted path: leaf} -> the nested dict (the inverse of leaf_paths on a dict tree)."""
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        *parents, name = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return out


def _check_fits_base(base: Params, name: str, targets: Mapping[Target, Mapping[str, Any]]) -> None:
    for (module, suffix), leaves in targets.items():
        kernel = _get(base, f"{module}.kernel")
        if kernel is None:
            raise LoraError(f"Adapter {name!r} adapts {module}, which the bank's base has no kernel for: wrong base.")
        d_in, d_out = np.shape(kernel)
        a, b = np.shape(leaves["a"]), np.shape(leaves["b"])
        width = d_out if not suffix else b[1]
        start = int(leaves.get("slice", 0)) * width
        if a[0] != d_in or a[1] != b[0] or start + b[1] > d_out or (suffix and d_out % width):
            raise LoraError(
                f"Adapter {name!r} has A {a} / B {b} at {module}{suffix}, whose kernel is {(d_in, d_out)}: "
                "it was trained on a different base."
            )


# ---------------------------------------------------------------------------------------------------------------
# Adding, loading, deleting, activating
# ---------------------------------------------------------------------------------------------------------------


def add(bank: AdapterBank, name: str, adapter: Params) -> AdapterBank:
    """The bank with `adapter` (a tree holding LoRA leaves: lora_params(...), load_adapter's params) as `name`."""
    if name in bank.slots:
        raise LoraError(f"The bank already holds an adapter {name!r}; delete it first or pick another name.")
    targets = targets_of(adapter)
    if not targets:
        raise LoraError(f"Adapter {name!r} carries no LoRA leaves; pass lora_params(params) or a loaded adapter.")
    _check_fits_base(bank.base, name, targets)
    extras = filter_leaves(adapter, lambda p: not is_lora_leaf(p))
    extras = _only_changed(bank.base, extras)
    ranks = {t: int(np.shape(v["a"])[1]) for t, v in targets.items()}
    stacked = set(targets_of(bank.stack))
    both = {m for m, s in stacked | set(targets) if s} & {m for m, s in stacked | set(targets) if not s}
    if both:
        raise LoraError(
            f"Adapter {name!r} and the bank adapt {sorted(both)[0]} both whole and by slices; a bank holds one "
            "kind per kernel: keep such adapters in separate banks."
        )
    if None not in bank.slots or max(ranks.values()) > bank.r_max or not set(targets) <= stacked:
        bank = _relayout(bank, targets, max(ranks.values()))
    slot = bank.slots.index(None)
    stack = _write_slot(bank.stack, slot, _slot_leaves(bank, targets))
    slots = bank.slots[:slot] + (name,) + bank.slots[slot + 1 :]
    return dataclasses.replace(
        bank, stack=stack, slots=slots, ranks={**bank.ranks, name: ranks}, extras={**bank.extras, name: extras}
    )


def _only_changed(base: Params, extras: Params) -> dict[str, Any]:
    """Non-LoRA leaves an adapter tree carries that differ from the base (load_adapter returns whole params)."""
    base_leaves = dict(leaf_paths(base))
    keep = {
        p: v
        for p, v in leaf_paths(extras)
        if p not in base_leaves or v is not base_leaves[p] and not np.array_equal(v, base_leaves[p])
    }
    return nest(keep)


def _slot_leaves(bank: AdapterBank, targets: Mapping[Target, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """One slot's worth of every stacked leaf: the adapter zero-padded to r_max, zeros where it adapts nothing.
    Built on the host (numpy), where O(adapter) work costs no dispatches."""
    out = {}
    for (module, suffix), stacked in targets_of(bank.stack).items():
        a = np.zeros(stacked["a"].shape[1:], stacked["a"].dtype)
        b = np.zeros(stacked["b"].shape[1:], stacked["b"].dtype)
        mine, scale = targets.get((module, suffix)), 0.0
        if mine is not None:
            r = np.shape(mine["a"])[1]
            a[:, :r], b[:r], scale = np.asarray(mine["a"]), np.asarray(mine["b"]), mine["scale"]
        out[f"{module}.{LORA_A}{suffix}"], out[f"{module}.{LORA_B}{suffix}"] = a, b
        # reshape: save_adapter's files store the scalar scale as shape (1,)
        out[f"{module}.{LORA_SCALE}{suffix}"] = np.asarray(scale, np.float32).reshape(())
    return out


@jax.jit
def _write_slot(stack: Params, slot: int, leaves: Mapping[str, jax.Array]) -> Params:
    flat = dict(leaf_paths(stack))
    updated = {p: (flat[p].at[slot].set(leaves[p]) if p in leaves else flat[p]) for p in flat}
    return nest(updated)


def _relayout(bank: AdapterBank, targets: Mapping[Target, Mapping[str, Any]], rank: int) -> AdapterBank:
    """A larger stack: every slot kept, free slots doubled if none is left, r_max and the kernels widened."""
    old = targets_of(bank.stack)
    capacity = len(bank.slots) if None in bank.slots else 2 * len(bank.slots)
    r_max = max(bank.r_max, rank)
    flat: dict[str, Any] = {}
    for module, suffix in sorted(set(old) | set(targets)):
        dtype = _get(bank.base, f"{module}.kernel").dtype
        prev = old.get((module, suffix))
        if prev is not None:
            d_in, d_out, slice_index = prev["a"].shape[1], prev["b"].shape[2], prev.get("slice")
        else:
            new = targets[module, suffix]
            d_in, d_out, slice_index = np.shape(new["a"])[0], np.shape(new["b"])[1], new.get("slice")
        a = np.zeros((capacity, d_in, r_max), dtype)
        b = np.zeros((capacity, r_max, d_out), dtype)
        scale = np.zeros((capacity,), np.float32)
        if prev is not None:
            n, r = prev["a"].shape[0], prev["a"].shape[2]
            a[:n, :, :r], b[:n, :r], scale[:n] = np.asarray(prev["a"]), np.asarray(prev["b"]), np.asarray(prev["scale"])
        flat[f"{module}.{LORA_A}{suffix}"], flat[f"{module}.{LORA_B}{suffix}"] = jnp.asarray(a), jnp.asarray(b)
        flat[f"{module}.{LORA_SCALE}{suffix}"] = jnp.asarray(scale)
        if suffix:
            flat[f"{module}.{LORA_SLICE}{suffix}"] = jnp.asarray(slice_index, jnp.int32)
    slots = bank.slots + (None,) * (capacity - len(bank.slots))
    return dataclasses.replace(bank, stack=nest(flat), slots=slots, r_max=r_max)


def load(bank: AdapterBank, name: str, directory: str | os.PathLike, model_type: str | None = None) -> AdapterBank:
    """Add an adapter from a directory: lora_jax's own (adapters.save_adapter) or, given the family's model_type,
    PEFT's (adapter_config.json). Refuses an adapter whose tensors do not fit the base."""
    from lora_jax import adapters, adapters_peft

    if model_type is None:
        params, _ = adapters.load_adapter(directory, bank.base)
    else:
        params, _ = adapters_peft.load_peft_adapter(directory, bank.base, model_type)
    return add(bank, name, params)


def delete(bank: AdapterBank, name: str) -> AdapterBank:
    """The bank without `name`: its slot is zeroed and freed (the layout, hence the compiled programs, stay)."""
    slot = bank.slot(name)
    stack = _write_slot(bank.stack, slot, _slot_leaves(bank, {}))
    slots = bank.slots[:slot] + (None,) + bank.slots[slot + 1 :]
    drop = lambda d: {k: v for k, v in d.items() if k != name}
    active = None if bank.active == name else bank.active
    return dataclasses.replace(
        bank, stack=stack, slots=slots, ranks=drop(bank.ranks), extras=drop(bank.extras), active=active
    )


def activate(bank: AdapterBank, name: str | None) -> AdapterBank:
    """The bank with `name` active (None: the bare base)."""
    if name is not None:
        bank.slot(name)
    return dataclasses.replace(bank, active=name)


def active_slot(bank: AdapterBank) -> jax.Array:
    """The active adapter's slot as an int32 array (-1: none), to pass to a jitted `select` without recompiling."""
    return jnp.asarray(-1 if bank.active is None else bank.slot(bank.active), jnp.int32)


def base_for(bank: AdapterBank, name: str | None) -> dict[str, Any]:
    """The base params with `name`'s own non-LoRA leaves (a head trained alongside); same structure as the base."""
    if name is None:
        return dict(bank.base)
    bank.slot(name)
    return combine(bank.base, bank.extras.get(name, {}))


def adapter(bank: AdapterBank, name: str) -> dict[str, Any]:
    """`name`'s LoRA leaves at their true ranks and targets, as lora_params would give them."""
    slot = bank.slot(name)
    flat = {}
    for (module, suffix), r in bank.ranks[name].items():
        flat[f"{module}.{LORA_A}{suffix}"] = bank.stack_leaf(module, LORA_A + suffix)[slot, :, :r]
        flat[f"{module}.{LORA_B}{suffix}"] = bank.stack_leaf(module, LORA_B + suffix)[slot, :r]
        flat[f"{module}.{LORA_SCALE}{suffix}"] = bank.stack_leaf(module, LORA_SCALE + suffix)[slot]
        if suffix:
            flat[f"{module}.{LORA_SLICE}{suffix}"] = bank.stack_leaf(module, LORA_SLICE + suffix)
    return nest(flat)


# ---------------------------------------------------------------------------------------------------------------
# Under jit: one adapter, or one per row
# ---------------------------------------------------------------------------------------------------------------


def select(base: Params, stack: Params, slot: jax.Array) -> dict[str, Any]:
    """Params with slot `slot`'s adapter (-1: the base's output exactly, through zero scales). Pure and jittable."""
    return combine(base, _gather(stack, slot))


def route(base: Params, stack: Params, adapter_ids: jax.Array) -> dict[str, Any]:
    """Params whose LoRA leaves carry a leading batch axis: row i uses slot adapter_ids[i] (-1: the bare base)."""
    return combine(base, _gather(stack, jnp.asarray(adapter_ids, jnp.int32)))


def route_grouped(base: Params, stack: Params, adapter_ids: jax.Array) -> tuple[dict[str, Any], jax.Array]:
    """(params, order) for rows sorted by adapter: run the model on `rows[order]`; `layers.Dense` then applies
    each adapter once to its group's tokens (`jax.lax.ragged_dot`) from the stack itself, with no per-row copy.
    Undo the order on the outputs with `outputs[jnp.argsort(order)]`. Id -1 rows form a group of scale 0."""
    ids = jnp.asarray(adapter_ids, jnp.int32) + 1  # group 0: the bare base
    order = jnp.argsort(ids, stable=True)
    flat: dict[str, Any] = {}
    for path, leaf in leaf_paths(stack):
        module, name = path.rsplit(".", 1)
        if not name.startswith(LORA_SLICE):
            leaf = jnp.concatenate([jnp.zeros_like(leaf[:1]), leaf])
            flat[f"{module}.{LORA_GROUPS}"] = jnp.bincount(ids, length=leaf.shape[0]).astype(jnp.int32)
        flat[path] = leaf
    return combine(base, nest(flat)), order


def mixed_apply(
    apply: Callable[..., Any], base: Params, stack: Params, adapter_ids: jax.Array, *rows: jax.Array
) -> Any:
    """`apply(params, *rows)` with row i through slot adapter_ids[i] (-1: the bare base); outputs keep row order.

    Picks by shape and backend: per-row gather (`route`) for rows of fewer than GROUPED_FROM tokens (decoding,
    short classification inputs), whose A/B copies cost (d_in + d_out) x r_max per row and no reordering; rows
    of GROUPED_FROM tokens or more on an accelerator are sorted into adapter groups (`route_grouped`), which
    reads each adapter once however many rows use it and pays one permutation of inputs and outputs. On CPU it
    always gathers: XLA:CPU runs ragged_dot far slower than the batched einsum (tens of times at 128 tokens).
    """
    if jax.default_backend() == "cpu" or rows[0].ndim < 2 or rows[0].shape[1] < GROUPED_FROM:
        return apply(route(base, stack, adapter_ids), *rows)
    params, order = route_grouped(base, stack, adapter_ids)
    out = apply(params, *(r[order] for r in rows))
    inverse = jnp.argsort(order)
    return jax.tree.map(lambda x: x[inverse] if getattr(x, "ndim", 0) and x.shape[0] == len(order) else x, out)


def routed_rows(params: Params) -> int | None:
    """How many rows `route`d params serve (their LoRA leaves' leading axis), or None for plain params."""
    leaves = {p.rsplit(".", 1)[-1]: leaf for p, leaf in leaf_paths(filter_leaves(params, is_lora_leaf))}
    if LORA_GROUPS in leaves:
        raise LoraError("Params from route_grouped cannot decode (rows change order); route rows with bank.route.")
    rows = [np.shape(leaf)[0] for name, leaf in leaves.items() if name.startswith(LORA_A) and np.ndim(leaf) == 3]
    return int(rows[0]) if rows else None


def repeat_rows(params: Params, times: int) -> dict[str, Any]:
    """`route`d params for rows x times rows, each row's adapter `times` times in a row: how beam search gives
    every beam its prompt's adapter. Plain params (no per-row leaves) come back as they are."""

    def repeat(path: str, leaf: Any) -> Any:
        name = path.rsplit(".", 1)[-1]
        factor, scale = name.startswith((LORA_A, LORA_B)), name.startswith(LORA_SCALE)
        per_row = factor and np.ndim(leaf) == 3 or scale and np.ndim(leaf) == 1
        return jnp.repeat(leaf, times, axis=0) if per_row else leaf

    if times == 1 or routed_rows(params) is None:
        return params
    return nest({p: repeat(p, leaf) for p, leaf in leaf_paths(params)})


def _gather(stack: Params, index: jax.Array) -> dict[str, Any]:
    safe = jnp.maximum(index, 0)

    def take(path: str, leaf: jax.Array) -> jax.Array:
        name = path.rsplit(".", 1)[-1]
        if name.startswith(LORA_SLICE):
            return leaf
        picked = jnp.take(leaf, safe, axis=0)
        return jnp.where(index >= 0, picked, 0.0) if name.startswith(LORA_SCALE) else picked

    return nest({p: take(p, leaf) for p, leaf in leaf_paths(stack)})


# ---------------------------------------------------------------------------------------------------------------
# Merging a bank adapter into the base, and switching merged adapters
# ---------------------------------------------------------------------------------------------------------------


def merge(bank: AdapterBank, name: str) -> dict[str, Any]:
    """The base (with `name`'s own head) with `name` folded into its kernels in float32: a plain model's params."""
    return lora.merge(combine(base_for(bank, name), adapter(bank, name)))


def unmerge(bank: AdapterBank, merged: Params, name: str) -> dict[str, Any]:
    """Take `name` back out of `merged` params (returns the kernels of the base, up to float32 rounding)."""
    return lora.strip_lora(lora.unmerge(merged, adapter(bank, name)))


def switch(bank: AdapterBank, merged: Params, old: str, new: str) -> dict[str, Any]:
    """Merged params of `old` -> merged params of `new`: W - s BA + s' B'A' in float32, rounded once per kernel.

    The two updates go in as one concatenated adapter [A' | A] [s'B' ; -sB], so a kernel both adapt is read and
    written once; kernels neither adapts are returned as they are.
    """
    from lora_jax.combination import combine_adapters

    difference = combine_adapters([adapter(bank, new), adapter(bank, old)], jnp.array([1.0, -1.0]), "cat")
    heads = {p: v for p, v in leaf_paths(base_for(bank, None)) if _get(bank.extras.get(old, {}), p) is not None}
    heads = combine(nest(heads), bank.extras.get(new, {}))
    return lora.merge(combine(combine(merged, heads), difference))
