"""Flax models that load Hugging Face checkpoints, built from `lora_jax.layers.Dense`.

How a model family plugs in (one file, `lora_jax/models/<family>.py`, plus its line in `hub.FAMILIES`):

    MODEL_TYPES: tuple[str, ...]            HF `config.json` model_type values the file handles
    LORA_TARGETS: dict[str, str]            the paper's names -> module patterns (lora_jax.lora rules):
                                            "q", "k", "v", "o" (attention output), "mlp" (both FFN kernels)
    FUSED: dict[str, tuple[str, ...]]       fused kernels and their slice names (GPT-2: {"c_attn": ("q","k","v")})
    Config                                  frozen dataclass; always has dtype (compute), param_dtype,
                                            remat, and the HF hyper-parameters it needs (LoRA dropout
                                            is LoraConfig's, read from the adapter's leaves)
    config_from_hf(hf: dict, task: str, num_labels: int | None) -> Config
    config_to_hf(config: Config, task: str) -> dict                  a config.json transformers can load
    build(config: Config, task: str) -> flax.linen.Module
    params_from_hf(state: dict[str, np.ndarray], config, task, seed=0) -> (params, newly_initialised: list[str])
    params_to_hf(params, config, task) -> dict[str, np.ndarray]     torch layout, HF key names

Tasks: "base" (no head), "sequence-classification" (num_labels >= 2; num_labels == 1 is regression, as in HF),
"causal-lm". A built module is called as
    module.apply({"params": p}, input_ids, attention_mask=None, token_type_ids=None, deterministic=True,
                 rngs={"dropout": key})
and returns a dict with "last_hidden_state" and, when the task has a head, "logits".

Param trees mirror HF module names (`roberta.encoder.layer.0.attention.self.query.kernel`), so LoRA target
patterns, PEFT adapter keys and checkpoint keys translate one to one: kernel <-> weight (transposed for
nn.Linear, as is for GPT-2's Conv1D), embedding <-> weight, LayerNorm scale <-> weight.
"""
