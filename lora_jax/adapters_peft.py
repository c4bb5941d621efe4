"""LoRA adapters in PEFT's format, so an adapter trained here loads with `PeftModel.from_pretrained` and back.

PEFT writes `adapter_config.json` and `adapter_model.safetensors` whose keys are the torch module names under
`base_model.model.`, with `lora_A.weight` (r, d_in) and `lora_B.weight` (d_out, r): the transposes of
lora_jax's `lora_a` (d_in, r) and `lora_b` (r, d_out). Heads listed in `modules_to_save` are stored under
their plain names (`base_model.model.classifier.out_proj.weight`). As lora_jax param trees mirror HF module
names, translating is renaming; the only family knowledge needed is which kernels HF stores untransposed
(GPT-2's Conv1D: PEFT's `fan_in_fan_out`), declared by the family's spec (`FamilySpec.conv1d`).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from lora_jax.lora import LORA_A, LORA_B, LORA_SCALE, LoraConfig, LoraError, available_kernels, is_lora_leaf
from lora_jax.methods import trainable_mask
from lora_jax.models import hub
from lora_jax.tree import Params, combine, leaf_paths

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPES = {
    "sequence-classification": "SEQ_CLS",
    "causal-lm": "CAUSAL_LM",
    "seq2seq-lm": "SEQ_2_SEQ_LM",
    "base": "FEATURE_EXTRACTION",
}
HEAD_MODULES = ("classifier", "score")  # PEFT adds these to modules_to_save for SEQ_CLS by itself
_TO_HF_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def _hf_module(path: str, params: Params, task: str) -> str:
    """Our module path -> the torch module name PEFT uses (a base model's names carry no prefix)."""
    head, _, rest = path.partition(".")
    return rest if task == "base" and len(params) == 1 and head in params else path


def _our_module(name: str, params: Params) -> str:
    if name.split(".", 1)[0] in params or len(params) != 1:
        return name
    return f"{next(iter(params))}.{name}"


def _saved_by_peft(path: str, modules_to_save: Sequence[str]) -> bool:
    """PEFT wraps (and loads from the adapter) every module whose name ends with a modules_to_save entry, as a
    plain string: "classifier" also takes DistilBERT's `pre_classifier`. Such a module's leaves are exported."""
    parts = path.split(".")[:-1]
    return any(".".join(parts[:i]).endswith(m) for m in modules_to_save for i in range(1, len(parts) + 1))


def _shortest_targets(adapted: list[str], universe: list[str]) -> list[str]:
    """Per adapted module, the shortest name suffix that, under PEFT's suffix rule, picks no other module."""
    others = set(universe) - set(adapted)
    picks = lambda suffix: any(n == suffix or n.endswith("." + suffix) for n in others)
    suffixes = set()
    for module in adapted:
        parts = module.split(".")
        suffixes.add(
            next(
                (".".join(parts[-k:]) for k in range(1, len(parts)) if not picks(".".join(parts[-k:]))),
                module,
            )
        )
    return sorted(suffixes)


def save_peft_adapter(
    out_dir: str | os.PathLike,
    params: Params,
    lora_config: LoraConfig,
    model_type: str,
    task: str,
    base_model_name_or_path: str = "",
) -> Path:
    """Write the LoRA leaves of `params` (and trained heads/biases) as a PEFT LoRA adapter."""
    if task not in TASK_TYPES:
        raise LoraError(f"PEFT export supports tasks {sorted(TASK_TYPES)}, got {task!r}.")
    family = hub.family(model_type)
    leaves = dict(leaf_paths(params))
    sliced = sorted(p for p in leaves if re.search(rf"\.{LORA_A}_\w+$", p))
    if sliced:
        raise LoraError(
            f"PEFT adapts fused kernels whole; {sliced[0].rsplit('.', 1)[0]} carries per-slice LoRA "
            "(c_attn.q), which PEFT cannot express: target the whole kernel or use adapters.save_adapter."
        )
    adapted = sorted(p.rsplit(".", 1)[0] for p in leaves if p.endswith("." + LORA_A))
    if not adapted:
        raise LoraError("These params carry no LoRA leaves; call lora_wrap before save_peft_adapter.")

    tensors, ranks, alphas = {}, {}, {}
    for module in adapted:
        name = _hf_module(module, params, task)
        a, b = np.asarray(leaves[f"{module}.{LORA_A}"]), np.asarray(leaves[f"{module}.{LORA_B}"])
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.T
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.T
        r = a.shape[1]
        scale = float(leaves[f"{module}.{LORA_SCALE}"])
        ranks[name] = r
        alphas[name] = round(scale * (np.sqrt(r) if lora_config.rslora else r), 6)

    # Non-LoRA leaves that train: a classification head (always, it is new), train_also modules, biases.
    mask = dict(leaf_paths(trainable_mask(params, lora_config)))
    heads = HEAD_MODULES if task == "sequence-classification" else ()
    modules_to_save = list(dict.fromkeys([*heads, *lora_config.train_also])) or None
    extra = [p for p in leaves if not is_lora_leaf(p) and (mask[p] or _saved_by_peft(p, modules_to_save or ()))]
    fan_in_fan_out = {not family.hf_transposed(m) for m in adapted}
    if len(fan_in_fan_out) > 1:
        raise LoraError(
            "PEFT needs one fan_in_fan_out for all targets; adapt Conv1D and Linear kernels apart."
        )
    for path in extra:
        module, leaf = path.rsplit(".", 1)
        value = np.asarray(leaves[path])
        if leaf == "kernel" and family.hf_transposed(path):
            value = value.T
        tensors[f"{PREFIX}{_hf_module(module, params, task)}.{_TO_HF_LEAF[leaf]}"] = value

    r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    universe = [_hf_module(m, params, task) for m in available_kernels(params)]
    config = {
        "peft_type": "LORA",
        "task_type": TASK_TYPES[task],
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _shortest_targets([_hf_module(m, params, task) for m in adapted], universe),
        "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha},
        "lora_dropout": lora_config.dropout,
        "bias": lora_config.bias,
        "use_rslora": lora_config.rslora,
        "init_lora_weights": True if lora_config.init == "kaiming" else "gaussian",
        "fan_in_fan_out": fan_in_fan_out.pop(),
        "modules_to_save": modules_to_save,
        "inference_mode": True,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    save_file(arrays, out / WEIGHTS, metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return out


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first pattern matching a trailing part of the module name."""
    return next((v for p, v in patterns.items() if re.match(rf"(.*\.)?({p})$", name)), default)


def load_peft_adapter(
    adapter_dir: str | os.PathLike, base_params: Params, model_type: str
) -> tuple[dict[str, Any], LoraConfig]:
    """Put a PEFT LoRA adapter onto `base_params` (from `hub.from_pretrained`); returns (params, config)."""
    folder = Path(adapter_dir)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise LoraError(
            f"No PEFT adapter in {folder}: expected {CONFIG} and {WEIGHTS} (PeftModel.save_pretrained)."
        )
    peft = json.loads((folder / CONFIG).read_text())
    if peft.get("peft_type") != "LORA" or peft.get("use_dora"):
        raise LoraError(
            f"{folder} holds a {peft.get('peft_type')} adapter (DoRA: {peft.get('use_dora')}); only LoRA."
        )
    family = hub.family(model_type)
    targets = peft.get("target_modules") or []
    init = peft.get("init_lora_weights", True)
    config = LoraConfig(
        r=peft["r"],
        alpha=peft["lora_alpha"],
        targets=(targets,) if isinstance(targets, str) else tuple(re.escape(t) for t in targets),
        dropout=peft.get("lora_dropout", 0.0),
        init="gaussian" if init == "gaussian" else "kaiming",
        rslora=peft.get("use_rslora", False),
        train_also=tuple(peft.get("modules_to_save") or ()),
        bias=peft.get("bias", "none"),
        fused=family.fused,
        rank_pattern=peft.get("rank_pattern") or {},
        alpha_pattern=peft.get("alpha_pattern") or {},
    )

    base = dict(leaf_paths(base_params))
    tree: dict[str, Any] = {}
    for key, value in load_file(str(folder / WEIGHTS)).items():
        name = key.removeprefix(PREFIX)
        module, _, leaf = name.rpartition(".")
        if module.endswith((".lora_A", ".lora_B")):
            module, kind = module.rsplit(".", 1)
            path = _our_module(module, base_params)
            kernel = base.get(f"{path}.kernel")
            if kernel is None:
                raise LoraError(
                    f"Adapter key {key!r} has no kernel {path}.kernel in the base params: wrong base."
                )
            node = _node(tree, path)
            node[LORA_A if kind == "lora_A" else LORA_B] = jnp.asarray(value.T, np.asarray(kernel).dtype)
            if kind == "lora_A":
                r = value.shape[0]
                a = _pattern_value(config.alpha_pattern, module, config.alpha)
                node[LORA_SCALE] = jnp.asarray(a / np.sqrt(r) if config.rslora else a / r, jnp.float32)
            continue
        path = _our_module(module, base_params)
        candidates = (
            [f"{path}.{leaf}"]
            if leaf == "bias"
            else [f"{path}.{n}" for n in ("kernel", "embedding", "scale")]
        )
        found = next((c for c in candidates if c in base), None)
        if found is None:
            raise LoraError(
                f"Adapter key {key!r} matches no base param ({' / '.join(candidates)}): wrong base."
            )
        if found.endswith(".kernel") and family.hf_transposed(found):
            value = value.T
        if value.shape != np.shape(base[found]):
            raise LoraError(
                f"Adapter key {key!r} has shape {value.shape}, base {found} {np.shape(base[found])}."
            )
        _node(tree, found.rsplit(".", 1)[0])[found.rsplit(".", 1)[1]] = jnp.asarray(value, base[found].dtype)
    return combine(base_params, tree), config


def _node(tree: dict[str, Any], path: str) -> dict[str, Any]:
    for name in path.split("."):
        tree = tree.setdefault(name, {})
    return tree
