"""Hugging Face checkpoint folders <-> (Flax module, params): the plumbing every model family shares.

A family file declares its architecture and a `FamilySpec` (lora_jax.models.spec, which also converts state
dicts); this file knows folders, hub downloads, safetensors/pickle files and tokenizers. Adding a family is its
file plus one line per model_type in `FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lora_jax.bottleneck import AdapterConfig, AdapterError
from lora_jax.lora import LoraConfig, merge
from lora_jax.models import gguf
from lora_jax.models.spec import FamilySpec, config_from_hf, config_to_hf, family_of, params_from_hf, params_to_hf
from lora_jax.quant import quantize_params
from lora_jax.tree import leaf_paths

log = logging.getLogger(__name__)

# HF config.json model_type -> the family file defining its `SPEC: FamilySpec` (imported only when used).
FAMILIES = {
    "bert": "lora_jax.models.bert",
    "roberta": "lora_jax.models.bert",
    "deberta-v2": "lora_jax.models.deberta",
    "gpt2": "lora_jax.models.gpt2",
    "t5": "lora_jax.models.t5",
    "mt5": "lora_jax.models.t5",
    "distilbert": "lora_jax.models.distilbert",
    "llama": "lora_jax.models.llama",
    "qwen2": "lora_jax.models.llama",
    "mistral": "lora_jax.models.llama",
}

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX = "pytorch_model.bin.index.json"


def family(model_type: str) -> FamilySpec:
    if model_type not in FAMILIES:
        raise ValueError(f"Unsupported model_type {model_type!r}; lora_jax supports {sorted(FAMILIES)}.")
    return importlib.import_module(FAMILIES[model_type]).SPEC


# ------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; a hub id via the local cache or a download (HF_HUB_OFFLINE=1: cache only)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.bin"]
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a local folder nor a reachable hub model ({type(e).__name__}); "
            f"download it first (`huggingface-cli download {name_or_path}`) or pass the folder's path."
        ) from None


def load_state(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder, as numpy arrays in torch layout."""
    if (folder / WEIGHTS).exists():
        return _read_safetensors([folder / WEIGHTS])
    if (folder / WEIGHTS_INDEX).exists():
        shards = sorted(set(json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        return _read_safetensors([folder / s for s in shards])
    torch_files = [folder / TORCH_WEIGHTS] if (folder / TORCH_WEIGHTS).exists() else []
    if (folder / TORCH_WEIGHTS_INDEX).exists():
        shards = json.loads((folder / TORCH_WEIGHTS_INDEX).read_text())["weight_map"].values()
        torch_files = [folder / s for s in sorted(set(shards))]
    if torch_files:
        return _read_torch(torch_files)
    raise FileNotFoundError(f"No {WEIGHTS} or {TORCH_WEIGHTS} in {folder}.")


def _read_safetensors(files: Sequence[Path]) -> dict[str, np.ndarray]:
    """Read through JAX on the host, whose numpy knows bfloat16 (safetensors' numpy reader does not), so bf16 and
    fp16 checkpoints load in their own dtype; params_from_hf casts them to param_dtype."""
    state = {}
    with jax.default_device(jax.local_devices(backend="cpu")[0]):  # this process's own, under multi-process too
        for file in files:
            with safe_open(file, framework="flax") as f:
                state.update({k: np.asarray(f.get_tensor(k)) for k in f.keys()})  # noqa: SIM118 (not a dict)
    return state


def _read_torch(files: Sequence[Path]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{files[0].name} is a torch pickle and torch is not installed; convert it to safetensors "
            "(transformers: model.save_pretrained(dir, safe_serialization=True)) or install torch."
        ) from None
    state = {}
    for file in files:
        for k, v in torch.load(file, map_location="cpu", weights_only=True).items():
            state[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return state


def load_tokenizer(folder: Path) -> Any:
    names = (
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "vocab.json",
        "spm.model",
        "spiece.model",
    )
    if not any((folder / n).exists() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def from_pretrained(
    name_or_path: str | os.PathLike,
    task: str = "base",
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    seed: int = 0,
    allow_unexpected: bool = False,
    quantize: str | None = None,
    quantize_embedding: bool = False,
    **config_overrides: Any,
) -> tuple[Any, dict[str, Any], Any, Any]:
    """(module, params, tokenizer, config) from an HF checkpoint folder, a hub id, or a GGUF file (or its folder).

    Heads the checkpoint lacks (a classifier on a base model) are initialised as transformers does, and their
    leaves named in one log line; `seed` picks their init. A checkpoint weight the model has no place for is
    an error naming it, unless `allow_unexpected` (then it is logged and left out). `config_overrides` replace
    Config fields, e.g. `hidden_dropout_prob=0.0, remat=True`. `quantize` ("nf4", "int8", "q8_0", "q4_1") holds
    the frozen kernels quantized (`lora_jax.quant.quantize_params`; heads stay float); "gguf" keeps a GGUF
    file's own Q8_0/Q4_1 blocks as they are (no requantization). `quantize_embedding` holds the token table
    quantized too (a `lora_jax.quant.Table`, which the tied LM head reads inside its matmul; with "gguf", the
    file's own blocks).
    """
    gguf_file = gguf.find_file(name_or_path)
    if quantize == "gguf" and gguf_file is None:
        raise ValueError(f"quantize='gguf' keeps a GGUF file's blocks, but {name_or_path} is no GGUF file; "
                         "use quantize='nf4', 'int8', 'q8_0' or 'q4_1'.")  # fmt: skip
    if quantize_embedding and quantize is None:
        raise ValueError("quantize_embedding=True needs a quantize method for the table: pass quantize='nf4' "
                         "(or 'int8', 'q8_0', 'q4_1', 'gguf').")  # fmt: skip
    if gguf_file is not None:
        keep = lambda name: gguf.LINEAR_WEIGHT.fullmatch(name) is not None or (  # noqa: E731
            quantize_embedding and name == gguf.TOKEN_EMBEDDING)
        checkpoint = gguf.load(gguf_file, keep_quantized=keep if quantize == "gguf" else False)
        hf, state, tokenizer = checkpoint.config, checkpoint.state, checkpoint.tokenizer
    else:
        folder = resolve(name_or_path)
        config_file = folder / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"No config.json in {folder}; is it a Hugging Face model folder?")
        hf, state, tokenizer = json.loads(config_file.read_text()), None, None
    config = config_from_hf(hf, task, num_labels)  # an unsupported model_type fails here, before any weight loads
    valid = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(config_overrides) - valid)
    if unknown:
        raise TypeError(f"Unknown config overrides {unknown}; valid fields: {sorted(valid)}.")
    config = dataclasses.replace(config, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    if gguf_file is None:
        state, tokenizer = load_state(folder), load_tokenizer(folder)
    # kept GGUF blocks: the family places and checks their float values, then the blocks replace those kernels
    blocks = {name: value for name, value in state.items() if isinstance(value, gguf.GGUFBlocks)}
    floats = {name: value.dequantize() if name in blocks else value for name, value in state.items()}
    params, new = params_from_hf(floats, config, task, seed=seed, allow_unexpected=allow_unexpected)
    if new:
        log.warning("newly initialised: %s", ", ".join(new))
    if blocks:
        params = gguf.with_blocks(params, blocks, param_dtype)
    elif quantize is not None:
        embedding = family_of(config).embedding_path(config) if quantize_embedding else None
        params = quantize_params(params, quantize, embeddings=(embedding,) if embedding else ())
    return family_of(config).build(config, task), params, tokenizer, config


# ------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------


def to_pretrained(
    module_or_config: Any,
    params: Mapping[str, Any],
    out_dir: str | os.PathLike,
    task: str,
    tokenizer: Any = None,
) -> Path:
    """Write config.json + model.safetensors that transformers' AutoModel classes load (LoRA merged in)."""
    config = getattr(module_or_config, "config", module_or_config)
    if any(p.rsplit(".", 1)[-1].startswith("lora_") for p, _ in leaf_paths(params)):
        params = merge(params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: _storable(v) for k, v in params_to_hf(params, config, task).items()}
    save_file(state, out / WEIGHTS, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_hf(config, task), indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _storable(value: Any) -> np.ndarray:
    value = np.ascontiguousarray(np.asarray(value))
    return value.astype(np.float32) if value.dtype == np.float64 else value


def lora_config(model_type: str, targets: Sequence[str] = ("q", "v"), **kw: Any) -> LoraConfig:
    """A LoraConfig for a family, with the paper's names (q, k, v, o, mlp) expanded to its module patterns."""
    spec = family(model_type)
    expanded = tuple(spec.lora_targets.get(t, t) for t in ([targets] if isinstance(targets, str) else targets))
    kw.setdefault("fused", spec.fused)
    return LoraConfig(targets=expanded, **kw)


def adapter_config(model_type: str, **kw: Any) -> AdapterConfig:
    """An AdapterConfig for a family, its adapter sites from the family spec; refused for a family without them."""
    spec = family(model_type)
    if not spec.adapter_sites and "sites" not in kw:
        with_sites = sorted(t for t in FAMILIES if family(t).adapter_sites)
        raise AdapterError(
            f"{spec.name} declares no adapter sites (FamilySpec.adapter_sites); use method=lora, bitfit or full, "
            f"or a family that has them: {with_sites}."
        )
    kw.setdefault("sites", spec.adapter_sites)
    return AdapterConfig(**kw)
