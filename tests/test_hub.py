"""Checkpoint folders <-> lora_jax: loading, exporting to transformers, and errors that name the problem."""

from __future__ import annotations

import json
import logging
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_jax.lora import LoraConfig, lora_wrap
from lora_jax.models import hub
from tests.test_models_bert import TOL, flax_outputs, make_hf, padded_batch, torch_outputs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def perturb_lora_b(params, scale=0.5, seed=0):
    """What training does to B (it starts at zero), so that merging really changes the kernels."""

    def f(path, leaf):
        if getattr(path[-1], "key", None) == "lora_b":
            key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(str(path).encode()) % 2**31)
            return scale * jax.random.normal(key, leaf.shape, leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(f, params)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_round_trip_to_transformers(tmp_path, model_type):
    task = "sequence-classification"
    hf = make_hf(model_type, task, tmp_path / "hf")
    batch = padded_batch(model_type)
    module, params, _, config = hub.from_pretrained(tmp_path / "hf", task=task)
    hub.to_pretrained(module, params, tmp_path / "plain", task)
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain").eval()
    assert type(back) is type(hf)
    assert np.abs(torch_outputs(back, *batch)["logits"] - torch_outputs(hf, *batch)["logits"]).max() <= TOL

    # LoRA-wrapped and trained (B perturbed): the export is merged and must equal lora_jax's unmerged model.
    lora = lora_wrap(params, hub.lora_config(model_type, ["q", "v", "mlp"], r=4, alpha=8), jax.random.key(0))
    lora = perturb_lora_b(lora)
    ours = flax_outputs(module, lora, *batch)["logits"]
    assert np.abs(ours - torch_outputs(hf, *batch)["logits"]).max() > 1e-2  # the adapter does something
    hub.to_pretrained(config, lora, tmp_path / "merged", task)
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert np.abs(torch_outputs(merged, *batch)["logits"] - ours).max() <= TOL


def test_base_checkpoint_round_trip_and_prefixes(tmp_path):
    hf = make_hf("bert", "base", tmp_path / "hf")  # BertModel: keys have no "bert." prefix
    batch = padded_batch("bert")
    module, params, _, _ = hub.from_pretrained(tmp_path / "hf")
    hub.to_pretrained(module, params, tmp_path / "out", "base")
    assert not any(k.startswith("bert.") for k in load_file(tmp_path / "out" / "model.safetensors"))
    back = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    real = batch[1].astype(bool)
    a, b = torch_outputs(back, *batch), torch_outputs(hf, *batch)
    assert np.abs(a["last_hidden_state"][real] - b["last_hidden_state"][real]).max() <= TOL
    assert np.abs(a["pooler_output"] - b["pooler_output"]).max() <= TOL


def test_new_head_is_reported_in_one_line(tmp_path, caplog):
    make_hf("roberta", "base", tmp_path)
    with caplog.at_level(logging.WARNING, logger="lora_jax.models.hub"):
        _, params, _, config = hub.from_pretrained(tmp_path, task="sequence-classification", num_labels=5)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "newly initialised: "
        + ", ".join(f"classifier.{m}.{leaf}" for m in ("dense", "out_proj") for leaf in ("bias", "kernel"))
    ]
    head = params["classifier"]
    assert head["out_proj"]["kernel"].shape == (32, 5) and not head["out_proj"]["bias"].any()
    assert abs(float(head["dense"]["kernel"].std()) - config.initializer_range) < 0.005  # HF's N(0, 0.02)


def test_sharded_and_torch_pickle_checkpoints(tmp_path):
    hf = make_hf("roberta", "sequence-classification", tmp_path / "full")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "pickle" / "pytorch_model.bin")
    batch = padded_batch("roberta")
    want = torch_outputs(hf, *batch)["logits"]
    for folder in ("sharded", "pickle"):
        module, params, _, _ = hub.from_pretrained(tmp_path / folder, task="sequence-classification")
        assert np.abs(flax_outputs(module, params, *batch)["logits"] - want).max() <= TOL, folder


def test_overrides_and_dtypes(tmp_path):
    make_hf("bert", "base", tmp_path)
    _, params, tokenizer, config = hub.from_pretrained(
        tmp_path, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, hidden_dropout_prob=0.0, remat=True
    )
    assert config.remat and config.hidden_dropout_prob == 0.0 and config.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert tokenizer is None  # the tiny folder has no tokenizer files
    with pytest.raises(TypeError, match="Unknown config overrides \\['hiden_size'\\]"):
        hub.from_pretrained(tmp_path, hiden_size=8)


def test_lora_config_expands_paper_names():
    config = hub.lora_config("roberta", ["q", "v", "dense"], r=4)
    assert isinstance(config, LoraConfig) and config.r == 4
    assert config.targets == (r"attention\.self\.query", r"attention\.self\.value", "dense")
    with pytest.raises(ValueError, match="Unsupported model_type 'falcon'"):
        hub.lora_config("falcon")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match=r"^Unsupported model_type 'mamba'; lora_jax supports \["):
        hub.from_pretrained(tmp_path)


def test_missing_weight_is_named(tmp_path):
    make_hf("roberta", "base", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.layer.1.attention.self.key.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match="'roberta.encoder.layer.1.attention.self.key.weight'"):
        hub.from_pretrained(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    make_hf("bert", "base", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"'bert\.encoder\.layer\.0\.intermediate\.dense\.\w+' has shape \(64"):
        hub.from_pretrained(tmp_path)


def test_unknown_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a reachable hub model"):
        hub.from_pretrained("nobody/no-such-model")
