"""GGUF files (llama.cpp's format) -> an HF config dict, a transformers tokenizer and HF-named tensors.

A GGUF holds everything a Hugging Face folder does, under llama.cpp's names: the config and the tokenizer as
metadata, the weights as ggml tensors (often in quantized blocks). This file translates all three so a GGUF loads
through the same family code as a safetensors checkpoint (`hub.from_pretrained("<file>.gguf")`):

    checkpoint = load("SmolLM2-135M-Instruct.Q4_1.gguf")          # or the folder holding it
    checkpoint.config     # {"model_type": "llama", "hidden_size": 576, ...}, as a config.json would say
    checkpoint.tokenizer  # a transformers fast tokenizer with the file's chat template
    checkpoint.state      # {"model.layers.0.self_attn.q_proj.weight": fp32 (576, 576), ...}, torch layout

llama.cpp's converter permutes the rows of every q_proj/k_proj (its RoPE pairs dimension i with i+1, HF's with
i+head_dim/2); that permutation is undone here. With `keep_quantized`, linear weights stay in the file's blocks
(`GGUFBlocks`), rows permuted the same way: a ggml row is a whole number of blocks, so this is exact;
`hub.from_pretrained(..., quantize="gguf")` makes them `lora_jax.quant` kernels over those very blocks.

Only the `gguf` package and transformers' tokenizer builder are used; torch is never imported.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp tensor names -> HF Llama module names ({i}: the layer). Every other tensor in a file is refused.
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LINEAR_WEIGHT = re.compile(r"(.*_proj|lm_head)\.weight")  # what `keep_quantized=True` keeps in blocks
TOKEN_EMBEDDING = "model.embed_tokens.weight"  # kept in blocks too when asked (hub's quantize_embedding)


@dataclasses.dataclass(frozen=True)
class GGUFBlocks:
    """A tensor left in the file's quantized blocks: the arguments of `lora_jax.quant.from_gguf_blocks`."""

    qtype: str  # ggml type name, e.g. "Q4_1", "Q8_0"
    data: np.ndarray  # uint8 (rows, bytes per row); rows in HF order (llama.cpp's Q/K permutation undone)
    shape: tuple[int, ...]  # torch shape of the dequantized tensor, (out_features, in_features)

    def dequantize(self, dtype: Any = np.float32) -> np.ndarray:
        """The float tensor (torch layout), by gguf's own dequantizer."""
        from gguf import GGMLQuantizationType, dequantize

        return dequantize(self.data, GGMLQuantizationType[self.qtype]).reshape(self.shape).astype(dtype)


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    config: dict[str, Any]  # config.json-style
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    state: dict[str, np.ndarray | GGUFBlocks]  # HF names, torch layout


# ------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------


def find_file(path: str | os.PathLike) -> Path | None:
    """The GGUF file `path` names: itself, or the only .gguf in a folder without a config.json; else None.

    A folder with a config.json is a Hugging Face folder, whatever else it holds.
    """
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"No GGUF file at {p}.")
        return p
    if not p.is_dir() or (p / "config.json").exists():
        return None
    files = sorted(p.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(f"{p} holds {len(files)} GGUF files ({', '.join(f.name for f in files)}); pass one's path.")
    return files[0] if files else None


def open_file(path: str | os.PathLike) -> Any:
    """A `gguf.GGUFReader` (memory-mapped) over the file `path` names (see `find_file`)."""
    file = find_file(path)
    if file is None:
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a folder holding one.")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError(f"Reading {file.name} needs the `gguf` package: pip install gguf.") from None
    return GGUFReader(file)


def load(
    path: str | os.PathLike, dtype: Any = np.float32, keep_quantized: bool | Callable[[str], bool] = False
) -> GGUFCheckpoint:
    """Config, tokenizer and tensors of a GGUF file (or the folder holding one), read in one pass."""
    reader = open_file(path)
    config = load_config(reader)
    return GGUFCheckpoint(config, load_tokenizer(reader), load_state(reader, config, dtype, keep_quantized))


# ------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------


def metadata(reader: Any) -> dict[str, Any]:
    """Every metadata field as a Python value (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def load_config(reader: Any, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config.json (model_type llama) the file's metadata describes."""
    meta = metadata(reader) if meta is None else meta
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; lora_jax reads {SUPPORTED_ARCHITECTURES}.")
    key = lambda name, default=None: meta.get(f"{arch}.{name}", default)  # noqa: E731
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(
            "This GGUF stores RoPE frequency factors (rope_freqs, Llama-3.1-style rope_scaling), which lora_jax "
            "cannot map back to a rope_scaling config; load the original safetensors checkpoint instead."
        )
    hidden, heads = key("embedding_length"), key("attention.head_count")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", key("rope.dimension_count", hidden // heads)),
        "hidden_act": "silu",
        "rms_norm_eps": _float32_value(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _float32_value(key("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(key),
        "vocab_size": key("vocab_size", len(meta.get("tokenizer.ggml.tokens", ()))),
        "max_position_embeddings": key("context_length"),
        # llama.cpp writes `output.weight` only when the LM head is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    missing = sorted(k for k in ("hidden_size", "intermediate_size", "num_hidden_layers") if config[k] is None)
    if missing or heads is None:
        raise ValueError(f"GGUF metadata lacks {missing or ['num_attention_heads']}; is the file complete?")
    return config


def _float32_value(value: float) -> float:
    # GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06. The shortest decimal that rounds to the
    # same float32 is the value the writer had (what config.json said).
    return float(str(np.float32(value)))


def _rope_scaling(key: Callable[..., Any]) -> dict[str, Any] | None:
    kind = key("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise ValueError(f"GGUF rope scaling {kind!r} is not supported; lora_jax reads 'linear' (or none).")
    return {"rope_type": "linear", "factor": _float32_value(key("rope.scaling.factor"))}


# ------------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------------


def load_tokenizer(reader: Any, meta: Mapping[str, Any] | None = None) -> Any:
    """The fast tokenizer transformers builds from this file (`AutoTokenizer.from_pretrained(gguf_file=...)`).

    Same builder (its GGUF vocab/merges -> `tokenizers` conversion), fed from the `gguf` reader, so no torch.
    """
    from transformers import PreTrainedTokenizerFast

    try:  # transformers >= 5
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:  # transformers 4.x
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    meta = metadata(reader) if meta is None else meta
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError("This GGUF file holds no tokenizer (no tokenizer.ggml.tokens); load one separately.")
    grouped = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # as transformers: a sentencepiece vocabulary that does not say otherwise gets BOS (llama.cpp does)
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, id_key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{id_key}_token_id")
        tokenizer_config[f"{name}_token"] = tokens[token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


# ------------------------------------------------------------------------------------------------------------
# Tensors
# ------------------------------------------------------------------------------------------------------------


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; one clear error for anything else."""
    base, _, suffix = gguf_name.rpartition(".")
    layer = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if layer and layer[2] in LAYER_NAMES:
        return f"model.layers.{layer[1]}.{LAYER_NAMES[layer[2]]}.{suffix}"
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart; is the file's architecture really llama?")


def expected_names(config: Mapping[str, Any]) -> list[str]:
    """The HF weight names a Llama with this config has (biases only where the config says so)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [] if config["tie_word_embeddings"] else ["lm_head.weight"]
    for i in range(config["num_hidden_layers"]):
        for part in LAYER_NAMES.values():
            names.append(f"model.layers.{i}.{part}.weight")
            is_attention = part.startswith("self_attn.") and part != "self_attn.o_proj"
            if (config["attention_bias"] and is_attention) or (config["mlp_bias"] and part.startswith("mlp.")):
                names.append(f"model.layers.{i}.{part}.bias")
    return names


def unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation along axis 0 (works on floats and on rows of raw blocks alike).

    llama.cpp stores each head's rows as (half, pair) interleaved, `w.reshape(heads, 2, d/2, ...).swapaxes(1, 2)`;
    this is the inverse.
    """
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _permuted_heads(name: str, config: Mapping[str, Any]) -> int | None:
    """How many heads llama.cpp permuted this tensor's rows over (q and k, weights and biases); None: untouched."""
    if ".self_attn.q_proj." in name:
        return config["num_attention_heads"]
    if ".self_attn.k_proj." in name:
        return config["num_key_value_heads"]
    return None


def load_state(
    reader: Any,
    config: Mapping[str, Any] | None = None,
    dtype: Any = np.float32,
    keep_quantized: bool | Callable[[str], bool] = False,
) -> dict[str, np.ndarray | GGUFBlocks]:
    """Every tensor under its HF name, in torch layout, dequantized to `dtype` (numpy, e.g. float32 or bfloat16).

    `keep_quantized`: True keeps the linear weights (`*_proj.weight`, `lm_head.weight`) stored in blocks as
    `GGUFBlocks`; a function of the HF name picks them instead. Float tensors (norms, F16/F32) are always arrays.
    """
    from gguf import GGMLQuantizationType, dequantize

    config = load_config(reader) if config is None else config
    keep = (lambda name: LINEAR_WEIGHT.fullmatch(name) is not None) if keep_quantized is True else keep_quantized
    float_types = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
    state = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists the fastest-varying axis first
        heads = _permuted_heads(name, config)
        permute = (lambda rows, h=heads: unpermute_rows(rows, h)) if heads else (lambda rows: rows)
        if keep and tensor.tensor_type not in float_types and keep(name):
            rows = np.asarray(tensor.data).reshape(shape[0], -1)
            state[name] = GGUFBlocks(tensor.tensor_type.name, np.array(permute(rows)), shape)
        else:  # np.array copies: F32 tensors would otherwise be read-only views of the memory-mapped file
            values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            state[name] = np.array(permute(values), dtype=dtype)
    missing = [n for n in expected_names(config) if n not in state]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"GGUF file lacks tensors {missing[:3]}{more} (HF names); it is truncated or not a Llama.")
    return state


# ------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------


def with_blocks(params: Any, blocks: Mapping[str, GGUFBlocks], dtype: Any = jnp.float32) -> Any:
    """`params` with each kernel whose HF weight is in `blocks` held as a quantized leaf over those blocks."""
    from lora_jax.models.spec import hf_key
    from lora_jax.quant import Table, from_gguf_blocks
    from lora_jax.tree import map_with_path

    placed = set()

    def leaf(path: str, value: Any) -> Any:
        name = hf_key(path) if path.endswith((".kernel", ".embedding")) else None
        if name not in blocks:
            return value
        placed.add(name)
        kernel = from_gguf_blocks(blocks[name].qtype, blocks[name].data, blocks[name].shape, dtype)
        return Table(kernel, tuple(blocks[name].shape), np.dtype(dtype)) if path.endswith(".embedding") else kernel

    params = map_with_path(leaf, params)
    if placed != set(blocks):
        raise ValueError(f"No kernel in the model for GGUF tensors {sorted(set(blocks) - placed)[:3]}.")
    return params
