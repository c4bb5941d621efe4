"""lora_jax: LoRA (Hu et al. 2021) as a Flax parameter transform, Flax models that load Hugging Face checkpoints,
and the paper's experiments. The core API lives in `lora_jax.lora`; it is re-exported here."""

from lora_jax.lora import LoraConfig, LoraError, lora_params, lora_wrap, merge, strip_lora, unmerge
from lora_jax.methods import count_params, lora_optimizer, partition, trainable_mask, unpartition

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraError",
    "count_params",
    "lora_optimizer",
    "lora_params",
    "lora_wrap",
    "merge",
    "partition",
    "strip_lora",
    "trainable_mask",
    "unmerge",
    "unpartition",
]
