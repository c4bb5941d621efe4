"""One PyTorch measurement of benchmarks/quant.py per process: PEFT LoRA on transformers' Llama, loaded from the same
checkpoint (the GGUF through transformers' own loader), fp32, or over bitsandbytes' 4-bit NF4 base (double
quantization, fp32 compute: QLoRA's recipe); the same LoRA (r, alpha = 2r, all seven linear layers, no dropout),
AdamW with decay on >= 2-D params, and the same batch and loss as the JAX workers."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import current_rss_mb, worker_main
from benchmarks.quant import LINEAR, QuantSpec, lm_batch, timed_training


def load(spec: QuantSpec):
    import transformers

    path = Path(spec.checkpoint)
    gguf = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent if gguf else path, dtype=torch.float32,
                                                              **gguf)  # fmt: skip
    if spec.base != "nf4":
        return model
    # bitsandbytes quantizes float weights while loading them: write the floats as a plain safetensors folder
    # (transformers refuses to save_pretrained a model it loaded from a GGUF), tied weights once.
    from safetensors.torch import save_file

    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, Path(tmp) / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        del model, state
        return transformers.AutoModelForCausalLM.from_pretrained(tmp, quantization_config=bnb, dtype=torch.float32,
                                                                 device_map="cpu")  # fmt: skip


def tensor_bytes(params: Any) -> int:
    """Bytes of the tensors, a 4-bit weight's quantization state (absmax, its own absmax and code) included."""
    total = 0
    for p in params:
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += sum(v.numel() * v.element_size() for v in state.as_dict().values() if torch.is_tensor(v))
    return total


def train(spec: QuantSpec) -> dict[str, Any]:
    import peft

    rss_start = current_rss_mb()
    torch.manual_seed(0)
    model = load(spec)
    if spec.base == "nf4":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, lora_dropout=0.0, target_modules=list(LINEAR),
                             task_type=peft.TaskType.CAUSAL_LM)  # fmt: skip
    model = peft.get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ], lr=1e-3)  # fmt: skip
    data = lm_batch(spec, shifted=False)
    inputs = {k: torch.from_numpy(data[k]).long() for k in ("input_ids", "attention_mask", "labels")}

    def one_step() -> float:
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    rss_setup = current_rss_mb()
    timing = timed_training(one_step, spec)
    return {
        **timing,
        "tokens_per_s": spec.batch * spec.seq / timing["median_s"],
        "trainable_params": sum(p.numel() for p in trainable),
        "frozen_base_mb": tensor_bytes(frozen) / 2**20,
        "trainable_mb": tensor_bytes(trainable) / 2**20,
        "bnb_4bit_layers": sum(type(m).__module__.startswith("bitsandbytes") for m in model.modules()),
        "rss_at_start_mb": rss_start,
        "rss_after_setup_mb": rss_setup,
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }


if __name__ == "__main__":
    worker_main(train, QuantSpec)
