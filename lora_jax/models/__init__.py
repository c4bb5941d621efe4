"""Flax models that load Hugging Face checkpoints, built from `lora_jax.layers.Dense`.

A model family is one file, `lora_jax/models/<family>.py`, plus one line per model_type in `hub.FAMILIES`. The
file defines its architecture and declares the rest in `SPEC`:

    Config(spec.ModelConfig)        frozen dataclass: the HF hyper-parameters it needs, under config.json's names
                                    (and num_labels if it has a classifier); ModelConfig adds dtype (compute),
                                    param_dtype, remat (LoRA dropout is LoraConfig's, read from the
                                    adapter's leaves)
    a flax module class             built as Model(config, task)
    SPEC = FamilySpec(...)          lora_jax.models.spec: the module class, model types, transformers class per
                                    task, LoRA target names, fused slices, backbone prefix, head modules, Conv1D
                                    kernels, key renames, ignored keys (buffers, pretraining heads), tied weights
    build = SPEC.build              (config, task) -> module, the task checked

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
