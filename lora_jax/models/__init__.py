"""Flax models that load Hugging Face checkpoints, built from `lora_jax.layers.Dense`.

A model family is one file, `lora_jax/models/<family>.py`, plus one line per model_type in `hub.FAMILIES`. The
file defines its architecture and declares the rest in `SPEC`:

    Config                          frozen dataclass: the HF hyper-parameters it needs, under config.json's names,
                                    plus dtype (compute), param_dtype, lora_dropout, remat (and num_labels if it
                                    has a classifier)
    build(config, task) -> flax.linen.Module
    SPEC = FamilySpec(...)          lora_jax.models.spec: model types, transformers class per task, LoRA target
                                    names, fused slices, backbone prefix, head modules, Conv1D kernels, key renames,
                                    ignored keys (buffers, pretraining heads), tied weights

Conversion is shared and driven by the spec: `spec.config_from_hf`, `config_to_hf`, `params_from_hf`,
`params_to_hf`; `tests/test_conformance.py` checks every registered family against transformers.

Tasks: "base" (no head), "sequence-classification" (num_labels >= 2; num_labels == 1 is regression, as in HF),
"causal-lm", "seq2seq-lm". A built module is called as
    module.apply({"params": p}, input_ids, attention_mask=None, token_type_ids=None, deterministic=True,
                 rngs={"dropout": key})
(T5: input_ids, attention_mask, decoder_input_ids) and returns a dict with "last_hidden_state" and, when the
task has a head, "logits".
"""

from lora_jax.models.hub import from_pretrained, lora_config, to_pretrained

__all__ = ["from_pretrained", "lora_config", "to_pretrained"]
