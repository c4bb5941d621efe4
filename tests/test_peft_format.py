"""PEFT-format adapters: lora_jax -> PeftModel.from_pretrained and PEFT -> lora_jax give the same outputs."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.adapters_peft import load_peft_adapter, save_peft_adapter
from lora_jax.lora import LoraError, lora_wrap
from lora_jax.methods import trainable_mask
from lora_jax.models import hub
from lora_jax.tree import leaf_paths
from tests.test_hub import perturb_lora_b
from tests.test_models_bert import TOL, flax_outputs, make_hf, padded_batch, torch_outputs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

AUTO = {"base": "AutoModel", "sequence-classification": "AutoModelForSequenceClassification"}


def perturb(params, prefix="classifier", seed=1):
    """Training-like change of the non-LoRA leaves under `prefix` (a head trained alongside LoRA)."""

    def f(path, leaf):
        if str(getattr(path[0], "key", "")) == prefix:
            return leaf + 0.1 * jax.random.normal(jax.random.key(seed), leaf.shape, leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(f, params)


@pytest.mark.parametrize(
    "model_type,task,targets,kw,expected_targets",
    [
        ("roberta", "sequence-classification", ["q", "v"], {}, ["query", "value"]),
        (
            "bert",
            "sequence-classification",
            ["q", "o", "mlp"],
            {"rank_pattern": {r"intermediate\.dense": 2}, "rslora": True},
            ["intermediate.dense", "output.dense", "query"],
        ),
        ("bert", "base", ["k", "v"], {"alpha": 16.0}, ["key", "value"]),
    ],
)
def test_lora_jax_adapter_loads_in_peft(tmp_path, model_type, task, targets, kw, expected_targets):
    make_hf(model_type, task, tmp_path / "base")
    module, params, _, _ = hub.from_pretrained(tmp_path / "base", task=task)
    train_also = ("classifier",) if task != "base" else ()
    config = hub.lora_config(
        model_type, targets, r=4, alpha=kw.pop("alpha", 8.0), train_also=train_also, **kw
    )
    params = perturb(perturb_lora_b(lora_wrap(params, config, jax.random.key(0))))
    batch = padded_batch(model_type)
    ours = flax_outputs(module, params, *batch)

    save_peft_adapter(tmp_path / "adapter", params, config, model_type, task, str(tmp_path / "base"))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["target_modules"] == expected_targets

    base = getattr(transformers, AUTO[task]).from_pretrained(tmp_path / "base")
    plain = torch_outputs(base.eval(), *batch)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    theirs = torch_outputs(model, *batch)
    if task == "base":
        real = batch[1].astype(bool)
        ours, theirs, plain = (x["last_hidden_state"][real] for x in (ours, theirs, plain))
    else:
        ours, theirs, plain = ours["logits"], theirs["logits"], plain["logits"]
    assert np.abs(ours - plain).max() > 1e-2  # the adapter changes the outputs...
    assert np.abs(ours - theirs).max() <= TOL  # ...and PEFT applies it exactly as lora_jax does


def test_peft_made_adapter_loads_in_lora_jax(tmp_path):
    task = "sequence-classification"
    make_hf("roberta", task, tmp_path / "base")
    torch.manual_seed(3)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    model = peft.get_peft_model(
        base, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.2 * torch.randn_like(p))  # what training would do
    model.save_pretrained(tmp_path / "adapter")
    batch = padded_batch("roberta")
    theirs = torch_outputs(model.eval(), *batch)["logits"]

    module, params, _, _ = hub.from_pretrained(tmp_path / "base", task=task)
    loaded, config = load_peft_adapter(tmp_path / "adapter", params, "roberta")
    ours = flax_outputs(module, loaded, *batch)["logits"]
    assert np.abs(ours - flax_outputs(module, params, *batch)["logits"]).max() > 1e-2
    assert np.abs(ours - theirs).max() <= TOL
    assert (config.r, config.alpha) == (4, 8)
    trains = {p for p, m in leaf_paths(trainable_mask(loaded, config)) if m}
    assert "classifier.out_proj.kernel" in trains
    assert "roberta.encoder.layer.1.attention.self.value.lora_b" in trains
    assert "roberta.encoder.layer.1.attention.self.key.kernel" not in trains


def test_per_slice_fused_lora_cannot_be_exported(tmp_path):
    attn = {"kernel": jnp.zeros((8, 24)), "lora_a_q": jnp.zeros((8, 2)), "lora_b_q": jnp.zeros((2, 8))}
    params = {"transformer": {"h": {"0": {"attn": {"c_attn": attn}}}}}
    config = hub.lora_config("gpt2", ["q"], r=2)
    with pytest.raises(
        LoraError, match="PEFT adapts fused kernels whole; transformer.h.0.attn.c_attn carries"
    ):
        save_peft_adapter(tmp_path, params, config, "gpt2", "causal-lm")


def test_wrong_base_is_named(tmp_path):
    make_hf("bert", "base", tmp_path / "bert")
    make_hf("roberta", "base", tmp_path / "roberta")
    _, bert_params, _, _ = hub.from_pretrained(tmp_path / "bert")
    _, roberta_params, _, _ = hub.from_pretrained(tmp_path / "roberta")
    with pytest.raises(LoraError, match="no LoRA leaves"):
        save_peft_adapter(tmp_path / "a", bert_params, hub.lora_config("bert"), "bert", "base")
    config = hub.lora_config("bert", ["q"], r=2)
    save_peft_adapter(
        tmp_path / "a", lora_wrap(bert_params, config, jax.random.key(0)), config, "bert", "base"
    )
    loaded, _ = load_peft_adapter(tmp_path / "a", roberta_params, "roberta")  # same names, same shapes: fine
    assert "lora_a" in loaded["roberta"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
    with pytest.raises(
        LoraError, match="'base_model.model.encoder.layer.0.attention.self.query.lora_A.weight'"
    ):
        load_peft_adapter(tmp_path / "a", {"gpt": {}, "other": {}}, "bert")
