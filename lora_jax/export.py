"""What a finished run is written as: the native adapter (default), a PEFT adapter, a merged HF checkpoint.

Each reads the best epoch's params where they are (on the devices): the adapter formats copy only their own
leaves to the host, so the frozen model never leaves the accelerator unless a merged checkpoint is asked for.
On several hosts every process reaches here, and only the first one writes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

from lora_jax.adapters import save_adapter
from lora_jax.bottleneck import ADAPTER_METHODS, FT_TOP2
from lora_jax.lora import LoraConfig, LoraError
from lora_jax.prefix import PREFIX_METHODS

EXPORTS = ("adapter", "peft", "merged")  # folder names under the run directory, too
# methods whose trained leaves make an adapter file
ADAPTER_FILE = ("lora", "bitfit", *ADAPTER_METHODS, FT_TOP2, *PREFIX_METHODS)


@dataclasses.dataclass(frozen=True)
class Export:
    """What the PEFT and merged exports need to know beyond the params: the HF task ("sequence-classification",
    "seq2seq-lm", "causal-lm"), the base model as the user named it, and the tokenizer to save beside a merged
    checkpoint."""

    task: str | None = None
    base_model: str = ""
    tokenizer: Any = None


def check_exports(kinds: tuple[str, ...], method: str) -> None:
    """One line for an export name that does not exist, a PEFT adapter asked of a run without LoRA, or a merged
    checkpoint asked of bottleneck adapters (extra layers, which no base checkpoint has)."""
    unknown = sorted(set(kinds) - set(EXPORTS))
    if unknown:
        raise ValueError(f"exports {unknown} unknown; choose from {list(EXPORTS)}.")
    if method != "lora" and "peft" in kinds:  # `adapter`, the default, is skipped for such runs instead
        raise ValueError(f"exports=[peft] needs method=lora (a {method} run has no adapter); use exports=[merged].")
    if method in ADAPTER_METHODS and "merged" in kinds:
        raise ValueError(f"exports=[merged] cannot hold {method}'s adapter layers (they do not merge); use [adapter].")
    if method in PREFIX_METHODS and "merged" in kinds:
        raise ValueError(f"exports=[merged] cannot hold a {method} run's special tokens; use exports=[adapter].")


def write_exports(
    out_dir: Path, kinds: tuple[str, ...], params: Any, lora_config: LoraConfig | None, module: nn.Module,
    method: str, export: Export,
) -> dict[str, str]:  # fmt: skip
    """Write each of `kinds` under `out_dir`; returns {kind: folder name}. A full fine-tune skips `adapter`."""
    written = {}
    for kind in kinds:
        if (kind == "adapter" and method not in ADAPTER_FILE) or (kind == "peft" and method != "lora"):
            continue
        if kind != "adapter" and export.task is None:
            raise LoraError(f"export {kind!r} needs the run's HF task (train(..., export=Export(task=...))).")
        if jax.process_index() == 0:
            _write(kind, out_dir / kind, params, lora_config, module, export, method)
        written[kind] = kind
    return written


def _write(kind: str, folder: Path, params: Any, lora_config: LoraConfig | None, module: nn.Module,
           export: Export, method: str) -> None:  # fmt: skip
    if kind == "adapter":
        save_adapter(folder, params, lora_config, method)
    elif kind == "peft":
        from lora_jax.adapters_peft import save_peft_adapter

        save_peft_adapter(folder, params, lora_config, module.config.model_type, export.task, export.base_model)
    else:
        from lora_jax.models.hub import to_pretrained

        to_pretrained(module, jax.device_get(params), folder, export.task, export.tokenizer)
