"""Dotted paths over parameter pytrees: naming leaves, matching them with patterns, filtering and merging.

Generic pytree plumbing that LoRA, the model families and the adapter formats all use; it knows nothing about
LoRA or any model. A path is the dict keys from the root joined by dots: `encoder.layer.3.attention.self.query`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax

Params = Mapping[str, Any]


class PathLeaf:
    """Base of pytree nodes that stand for one logical weight (a quantized kernel: packed arrays plus scales).

    jax sees their arrays; the path helpers below see one leaf, so a mask, a count or an adapter names the
    weight (`...query.kernel`), never its packed parts.
    """


def is_path_leaf(x: Any) -> bool:
    return isinstance(x, PathLeaf)


def matches_module(pattern: str, module_path: str) -> bool:
    """True if `pattern` matches a trailing run of whole components of `module_path` (PEFT's suffix rule)."""
    return re.search(rf"(?:^|\.)(?:{pattern})$", module_path) is not None


def matches_leaf(pattern: str, leaf_path: str) -> bool:
    """True if `pattern` matches a run of whole components anywhere in `leaf_path`."""
    return re.search(rf"(?:^|\.)(?:{pattern})(?:\.|$)", leaf_path) is not None


def key_name(key: Any) -> str:
    """A jax key-path entry (dict key, attribute, sequence index) as one path component."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
    """(dotted path, leaf) for every leaf (a `PathLeaf` counts as one), in pytree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_path_leaf)
    return [(".".join(key_name(k) for k in path), leaf) for path, leaf in flat]


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """`jax.tree.map` whose function also receives each leaf's dotted path."""
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: fn(".".join(key_name(k) for k in p), leaf), tree, is_leaf=is_path_leaf
    )


def filter_leaves(tree: Params, keep: Callable[[str], bool], prefix: str = "") -> dict[str, Any]:
    """The nested dict of the leaves whose dotted path `keep` accepts; emptied dicts are dropped."""
    out = {}
    for name, child in tree.items():
        path = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(child, Mapping):
            sub = filter_leaves(child, keep, path)
            if sub:
                out[name] = sub
        elif keep(path):
            out[name] = child
    return out


def combine(base: Params, extra: Params) -> dict[str, Any]:
    """Deep-merge two nested dicts (e.g. base params and an adapter); `extra` wins on clashes."""
    out = dict(base)
    for name, child in extra.items():
        if isinstance(child, Mapping) and isinstance(out.get(name), Mapping):
            out[name] = combine(out[name], child)
        else:
            out[name] = child
    return out
