"""Adapter-only files: the LoRA or prefix-tuning leaves (plus `train_also` leaves) and the LoraConfig, nothing of
the base model.

A directory holds `adapter.safetensors` (dotted param paths as keys) and `lora_config.json` (the config, the
tensor file's sha256 and the shapes). Both are written to temporary names and renamed, so a crash never leaves a
half-written adapter behind; the checksum catches a file corrupted later. PEFT's format lives in
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

from lora_jax.lora import LoraConfig, LoraError, is_lora_leaf, trainable_mask
from lora_jax.prefix import EMBED_LEAVES, is_prefix_leaf
from lora_jax.tree import Params, combine, leaf_paths

TENSORS = "adapter.safetensors"
CONFIG = "lora_config.json"
FORMAT_VERSION = 1


def adapter_leaves(params: Params, config: LoraConfig) -> dict[str, np.ndarray]:
    """Flat {dotted path: array} of what an adapter must carry: LoRA or prefix leaves and trainable others."""
    mask = dict(leaf_paths(trainable_mask(params, config)))
    keep = lambda path: is_lora_leaf(path) or is_prefix_leaf(path) or mask[path]  # noqa: E731
    return {path: np.asarray(leaf) for path, leaf in leaf_paths(params) if keep(path)}


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


def save_adapter(directory: str | os.PathLike, params: Params, config: LoraConfig) -> Path:
    """Write the adapter of `params` to `directory` (created if needed); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_leaves(params, config)
    if not any(is_lora_leaf(p) or is_prefix_leaf(p) for p in tensors):
        raise LoraError(
            "These params carry no LoRA or prefix leaves; call lora_wrap before save_adapter (or prefix_wrap)."
        )
    tensor_path = directory / TENSORS
    _atomic_write(
        tensor_path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp)
    )
    meta = {
        "format_version": FORMAT_VERSION,
        "lora_config": config.to_dict(),
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

    lora_only: take the LoRA (or prefix) leaves and leave the rest (e.g. a head for another label set) as in
    `base_params`; this is how the paper starts MRPC/RTE/STS-B from the MNLI adapter.

    Every adapter tensor must land on a path the base model has (LoRA leaves beside an existing kernel) with
    the shape it was saved with; anything else is a mismatched adapter and is refused by name.
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
        if lora_only and not (is_lora_leaf(path) or is_prefix_leaf(path)):
            continue
        module = path.rsplit(".", 1)[0]
        if is_lora_leaf(path):
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
        elif is_prefix_leaf(path):
            _check_prefix_leaf(path, value, base)
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
