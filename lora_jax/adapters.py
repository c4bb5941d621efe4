"""Adapter-only files: a method's own leaves (LoRA's, a bottleneck adapter's, prefix tuning's special tokens) plus
the other leaves it trains (`train_also`, FT-Top2's layers) and the LoraConfig, nothing else of the base model.

A directory holds `adapter.safetensors` (dotted param paths as keys) and `lora_config.json` (the config, the
tensor file's sha256 and the shapes). Both are written to temporary names and renamed, so a crash never leaves a
half-written adapter behind; the checksum catches a file corrupted later. The json also names the training method
(and a bottleneck adapter's AdapterConfig), which `load_adapter_method` reads. PEFT's format lives in
`adapters_peft.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from lora_jax.bottleneck import DESIGNS, DOWN, LN_BIAS, LN_SCALE, AdapterConfig, is_adapter_leaf
from lora_jax.lora import LoraConfig, LoraError, is_lora_leaf
from lora_jax.methods import trainable_mask
from lora_jax.prefix import EMBED_LEAVES, PREFIX_METHODS, is_prefix_leaf
from lora_jax.tree import Params, combine, leaf_paths

TENSORS = "adapter.safetensors"
CONFIG = "lora_config.json"
FORMAT_VERSION = 1


def _added(path: str) -> bool:
    """A leaf a method adds to the base model's params (LoRA's, an adapter's, a prefix's)."""
    return is_lora_leaf(path) or is_adapter_leaf(path) or is_prefix_leaf(path)


def adapter_leaves(params: Params, config: LoraConfig, method: str = "lora") -> dict[str, np.ndarray]:
    """Flat {dotted path: array} of what an adapter must carry: the method's added leaves and what else trains."""
    mask = dict(leaf_paths(trainable_mask(params, config, method)))
    return {path: np.asarray(leaf) for path, leaf in leaf_paths(params) if _added(path) or mask[path]}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(
    directory: str | os.PathLike, params: Params, config: LoraConfig, method: str = "lora",
    adapter_config: AdapterConfig | None = None,
) -> Path:  # fmt: skip
    """Write what `method` trained in `params` to `directory` (created if needed); returns the directory."""
    directory = Path(directory)
    if method == "full":
        raise LoraError("A full fine-tune has no adapter (every weight trains); export it merged (exports=[merged]).")
    tensors = adapter_leaves(params, config, method)
    if method == "lora" and not any(is_lora_leaf(p) or is_prefix_leaf(p) for p in tensors):
        raise LoraError(
            "These params carry no LoRA or prefix leaves; call lora_wrap before save_adapter (or prefix_wrap)."
        )
    if method in DESIGNS and not any(is_adapter_leaf(p) for p in tensors):
        raise LoraError(f"These params carry no adapter leaves; call bottleneck.adapter_wrap before saving {method}.")
    if method in PREFIX_METHODS and not any(is_prefix_leaf(p) for p in tensors):
        raise LoraError(f"These params carry no prefix leaves; call prefix.prefix_wrap before saving {method}.")
    directory.mkdir(parents=True, exist_ok=True)
    tensor_path = directory / TENSORS
    _atomic_write(
        tensor_path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp)
    )
    meta = {
        "format_version": FORMAT_VERSION,
        "lora_config": config.to_dict(),
        "method": method,
        "adapter_config": adapter_config.to_dict() if adapter_config is not None else None,
        "sha256": _sha256(tensor_path),
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
    }
    _atomic_write(
        directory / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, sort_keys=True))
    )
    return directory


def load_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    meta = _read_meta(Path(directory))
    return LoraConfig.from_dict(meta["lora_config"])


def load_adapter_method(directory: str | os.PathLike) -> tuple[str, AdapterConfig | None]:
    """(training method, AdapterConfig or None) of a saved adapter; files from before methods were recorded: lora."""
    meta = _read_meta(Path(directory))
    adapter = meta.get("adapter_config")
    return meta.get("method", "lora"), AdapterConfig.from_dict(adapter) if adapter else None


def _read_meta(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG
    if not config_path.is_file() or not (directory / TENSORS).is_file():
        raise LoraError(
            f"No adapter in {directory}: expected {CONFIG} and {TENSORS} written by save_adapter."
        )
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise LoraError(f"{config_path} is not valid JSON ({e}); re-save the adapter.") from e


def load_adapter(
    directory: str | os.PathLike, base_params: Params, lora_only: bool = False
) -> tuple[dict[str, Any], LoraConfig]:
    """Put a saved adapter onto `base_params`; returns (params, config).

    lora_only: take the added leaves (LoRA's, an adapter's, a prefix's) and leave the rest (e.g. a head for another
    label set) as in `base_params`; this is how the paper starts MRPC/RTE/STS-B from the MNLI adapter.

    Every adapter tensor must land on a path the base model has (added leaves beside an existing kernel of the
    width they expect) with the shape it was saved with; anything else is a mismatched adapter, refused by name.
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    tensor_path = directory / TENSORS
    if _sha256(tensor_path) != meta.get("sha256"):
        raise LoraError(
            f"{tensor_path} does not match its checksum in {CONFIG}: the file is corrupted; re-save it."
        )
    config = LoraConfig.from_dict(meta["lora_config"])
    tensors = load_file(str(tensor_path))

    base = dict(leaf_paths(base_params))
    tree: dict[str, Any] = {}
    for path, value in sorted(tensors.items()):
        if lora_only and not _added(path):
            continue
        module = path.rsplit(".", 1)[0]
        if is_prefix_leaf(path):
            _check_prefix_leaf(path, value, base)
        elif _added(path):
            kernel = base.get(f"{module}.kernel")
            if kernel is None:
                raise LoraError(
                    f"Adapter key {path!r} has no kernel {module}.kernel in the base params: wrong base model."
                )
            name = path.rsplit(".", 1)[-1]
            if name.startswith("lora_a") and value.shape[0] != np.shape(kernel)[0]:
                raise LoraError(
                    f"Adapter key {path!r} expects d_in={value.shape[0]}, {module}.kernel has "
                    f"{np.shape(kernel)[0]}: wrong base model."
                )
            if name in (DOWN, LN_SCALE, LN_BIAS) and value.shape[0] != np.shape(kernel)[1]:
                raise LoraError(
                    f"Adapter key {path!r} expects d_model={value.shape[0]}, {module}.kernel gives "
                    f"{np.shape(kernel)[1]}: wrong base model."
                )
        elif path not in base:
            raise LoraError(f"Adapter key {path!r} is not in the base params: wrong base model.")
        elif np.shape(base[path]) != value.shape:
            raise LoraError(
                f"Adapter key {path!r} has shape {value.shape}, the base has {np.shape(base[path])}: wrong base model."
            )
        node = tree
        *parents, leaf = path.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return combine(base_params, tree), config


def _check_prefix_leaf(path: str, value: np.ndarray, base: dict[str, Any]) -> None:
    """A prefix leaf sits beside the token embedding (rows as wide as its table) or in a layer of the stack."""
    module, name = path.rsplit(".", 1)
    if name in EMBED_LEAVES:
        table = base.get(f"{module}.embedding")
        if table is None or np.shape(table)[-1] != value.shape[-1]:
            raise LoraError(
                f"Adapter key {path!r} needs a token embedding {module}.embedding of width {value.shape[-1]} in the "
                "base params: wrong base model."
            )
    elif not any(p.startswith(module + ".") for p in base):
        raise LoraError(f"Adapter key {path!r} has no layer {module} in the base params: wrong base model.")
