"""Every registered family against transformers: parity, HF round trip, PEFT both ways, half-precision files, and
the checkpoint errors. A new family gets all of it by registering in `hub.FAMILIES` and adding its tiny random
config to `TINY` below (test_every_family_has_a_tiny_config fails until it does)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.adapters_peft import TASK_TYPES, load_peft_adapter, save_peft_adapter
from lora_jax.lora import lora_wrap
from lora_jax.models import from_pretrained, hub, to_pretrained
from lora_jax.models.spec import CheckpointError, config_from_hf, config_to_hf, params_from_hf, params_to_hf
from lora_jax.tree import leaf_paths
from tests.test_hub import perturb_lora_b

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4
CLS = "sequence-classification"
_BERTISH = dict(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=40, num_labels=3,
)  # fmt: skip
_T5 = dict(
    vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=12, decoder_start_token_id=0, pad_token_id=0,
)  # fmt: skip
_LLAMA = dict(
    vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=40, num_labels=3, pad_token_id=0, tie_word_embeddings=True,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Tiny:
    """A tiny random transformers config for one model_type, the headed task to test, and a backbone module
    to train in full beside LoRA (PEFT's modules_to_save)."""

    config: dict
    task: str
    train_also: str
    pad: int = 0


TINY = {
    "bert": Tiny(_BERTISH, CLS, "layer.1.output.dense"),
    "roberta": Tiny({**_BERTISH, "pad_token_id": 1}, CLS, "layer.1.output.dense", pad=1),
    "distilbert": Tiny(
        dict(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=40, num_labels=3),
        CLS,
        "layer.1.ffn.lin2",
    ),
    "deberta-v2": Tiny(
        {
            **_BERTISH,
            "relative_attention": True,
            "position_buckets": 8,
            "pos_att_type": ["p2c", "c2p"],
            "share_att_key": True,
            "norm_rel_ebd": "layer_norm",
            "position_biased_input": False,
            "type_vocab_size": 0,
        },
        CLS,
        "layer.1.output.dense",
    ),  # fmt: skip
    # A Conv1D module trained in full: exported untransposed, with fan_in_fan_out.
    "gpt2": Tiny(
        dict(vocab_size=100, n_positions=40, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2),
        "causal-lm",
        "h.1.mlp.c_fc",
    ),
    "t5": Tiny({**_T5, "feed_forward_proj": "relu"}, "seq2seq-lm", "block.1.layer.1.DenseReluDense.wo"),
    "mt5": Tiny(
        {**_T5, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
        "seq2seq-lm",
        "block.1.layer.1.DenseReluDense.wo",
    ),
    # grouped-query attention, untied head; qwen2 adds q/k/v biases, mistral a head_dim of its own
    "llama": Tiny({**_LLAMA, "tie_word_embeddings": False}, "causal-lm", "layers.1.mlp.down_proj"),
    "qwen2": Tiny({**_LLAMA, "use_sliding_window": False}, CLS, "layers.1.mlp.down_proj"),
    "mistral": Tiny({**_LLAMA, "head_dim": 16, "sliding_window": None}, "causal-lm", "layers.1.mlp.up_proj"),
}


@dataclasses.dataclass
class Family:
    model_type: str
    tiny: Tiny
    folder: object
    torch_model: object
    module: object
    params: dict
    config: object
    batch: dict
    forward: Callable

    @property
    def spec(self):
        return hub.family(self.model_type)

    @property
    def task(self) -> str:
        return self.tiny.task

    def torch_class(self):
        return getattr(transformers, self.spec.architectures[self.model_type, self.task])

    def ours(self, params) -> np.ndarray:
        return _select(np.asarray(self.forward(params, self.batch)["logits"]), self.batch, self.task)

    def theirs(self, model) -> np.ndarray:
        with torch.no_grad():
            out = model(**{k: torch.tensor(v) for k, v in self.batch.items()})
        return _select(out.logits.float().numpy(), self.batch, self.task)


def _forward(module) -> Callable:
    """One jitted forward per family, reused by all its tests (a LoRA-wrapped tree compiles once more)."""

    def run(params, batch):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        return module.apply({"params": params}, batch.pop("input_ids"), batch.pop("attention_mask"), **batch)

    return jax.jit(run)


def _select(logits: np.ndarray, batch: dict, task: str) -> np.ndarray:
    """Logits at real tokens: a causal LM's padded positions are garbage in both frameworks."""
    return logits[batch["attention_mask"].astype(bool)] if task == "causal-lm" else logits


def _batch(tiny: Tiny) -> dict:
    """Two rows, the second right-padded after 5 tokens; an encoder-decoder gets decoder inputs too."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 100, size=(2, 9))
    mask = np.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = tiny.pad, 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if tiny.task == "seq2seq-lm":
        batch["decoder_input_ids"] = np.concatenate([np.zeros((2, 1), int), rng.integers(3, 100, (2, 5))], 1)
    return batch


def _randomise(model):
    """Random norm scales and biases, so that a swapped or dropped 1-D leaf cannot hide behind 1s and 0s."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(TINY))
def fam(request, tmp_path_factory) -> Family:
    model_type = request.param
    tiny = TINY[model_type]
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(model_type, **tiny.config)
    cls = getattr(transformers, hub.family(model_type).architectures[model_type, tiny.task])
    model = _randomise(cls(hf_config))
    folder = tmp_path_factory.mktemp(model_type)
    model.save_pretrained(folder)
    module, params, _, config = from_pretrained(folder, task=tiny.task)
    return Family(model_type, tiny, folder, model, module, params, config, _batch(tiny), _forward(module))


def test_every_family_has_a_tiny_config():
    assert set(hub.FAMILIES) == set(TINY), "add the new family's tiny random config to TINY"


def test_matches_transformers_on_a_padded_batch(fam):
    diff = np.abs(fam.ours(fam.params) - fam.theirs(fam.torch_model)).max()
    assert diff <= TOL, diff


def test_round_trip_hf_lora_jax_hf(fam, tmp_path):
    dtypes = {"dtype": fam.config.dtype, "param_dtype": fam.config.param_dtype}  # ours, not config.json's
    assert dataclasses.replace(config_from_hf(config_to_hf(fam.config, fam.task), fam.task), **dtypes) == fam.config
    state = params_to_hf(fam.params, fam.config, fam.task)
    back, new = params_from_hf(state, fam.config, fam.task)
    assert new == []
    jax.tree.map(np.testing.assert_array_equal, back, fam.params)
    torch_state = fam.torch_model.state_dict()
    for key, value in state.items():  # same names, same layout, same values as transformers' own
        np.testing.assert_array_equal(value, torch_state[key].numpy(), err_msg=key)

    to_pretrained(fam.module, fam.params, tmp_path, fam.task)
    model, info = fam.torch_class().from_pretrained(tmp_path, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert np.abs(fam.theirs(model.eval()) - fam.theirs(fam.torch_model)).max() <= TOL


def _train_also(params, pattern: str, seed: int = 2):
    """What training does to a module trained in full beside LoRA."""
    leaves = dict(leaf_paths(params))
    key = jax.random.key(seed)
    changed = {
        p: v + 0.3 * jax.random.normal(key, v.shape, v.dtype) for p, v in leaves.items() if re.search(pattern, p)
    }
    assert changed, pattern
    return jax.tree_util.tree_map_with_path(lambda path, v: changed.get(".".join(str(k.key) for k in path), v), params)


def test_peft_adapter_both_ways(fam, tmp_path):
    spec = fam.spec
    # PEFT adapts fused kernels whole: GPT-2's whole c_attn (Conv1D) beside its c_proj.
    targets = (*spec.fused, "o") if spec.fused else ("q", "v")
    lora_config = hub.lora_config(fam.model_type, targets, r=4, alpha=8, train_also=(fam.tiny.train_also,))
    trained = _train_also(perturb_lora_b(lora_wrap(fam.params, lora_config, jax.random.key(0))), fam.tiny.train_also)
    ours = fam.ours(trained)
    assert np.abs(ours - fam.ours(fam.params)).max() > 10 * TOL  # the adapter does far more than the tolerance

    save_peft_adapter(tmp_path / "ours", trained, lora_config, fam.model_type, fam.task)
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["fan_in_fan_out"] == bool(spec.conv1d)
    base = fam.torch_class().from_pretrained(fam.folder)
    theirs = fam.theirs(peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval())
    assert np.abs(ours - theirs).max() <= TOL

    # PEFT -> lora_jax: an adapter PEFT made and "trained" itself, on the same modules.
    torch.manual_seed(3)
    peft_config = peft.LoraConfig(
        task_type=TASK_TYPES[fam.task], r=4, lora_alpha=8, target_modules=written["target_modules"],
        fan_in_fan_out=written["fan_in_fan_out"], modules_to_save=written["modules_to_save"],
    )  # fmt: skip
    model = peft.get_peft_model(fam.torch_class().from_pretrained(fam.folder), peft_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "theirs")
    loaded, _ = load_peft_adapter(tmp_path / "theirs", fam.params, fam.model_type)
    assert np.abs(fam.ours(loaded) - fam.theirs(model.eval())).max() <= TOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_loads(fam, tmp_path, dtype):
    half = fam.torch_class().from_pretrained(fam.folder).to(getattr(torch, dtype))
    half.save_pretrained(tmp_path)
    _, params, _, _ = from_pretrained(tmp_path, task=fam.task)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    upcast = half.float().eval()  # the rounded weights, computed in float32 as ours are
    assert np.abs(fam.ours(params) - fam.theirs(upcast)).max() <= TOL


def test_checkpoint_errors_name_the_key(fam):
    spec, config, task = fam.spec, fam.config, fam.task
    state = params_to_hf(fam.params, config, task)
    key = next(k for k in state if not spec.is_head(k) and k not in spec.tied)

    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(CheckpointError, match=f"has no {re.escape(repr(key))}") as error:
        params_from_hf(missing, config, task)
    assert isinstance(error.value, KeyError) and isinstance(error.value, ValueError)

    misshapen = {**state, key: np.zeros((*state[key].shape[:-1], state[key].shape[-1] + 1), np.float32)}
    with pytest.raises(CheckpointError, match=f"{re.escape(repr(key))} has shape"):
        params_from_hf(misshapen, config, task)

    extra = {**state, "encoder.bogus.weight": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match=r"\['[\w.]*encoder\.bogus\.weight'\] have no place"):
        params_from_hf(extra, config, task)
    allowed, _ = params_from_hf(extra, config, task, allow_unexpected=True)
    jax.tree.map(np.testing.assert_array_equal, allowed, fam.params)


def test_missing_heads_are_reported_by_leaf_path(fam):
    spec = fam.spec
    backbone = {k: v for k, v in fam.params.items() if not spec.is_head(k)}
    state = params_to_hf(backbone, fam.config, "base")  # as the base class (BertModel, GPT2Model) saves it
    params, new = params_from_hf(state, fam.config, fam.task)
    assert new == [p for p, _ in leaf_paths(fam.params) if p.split(".")[0] not in backbone]
    assert jax.tree.structure(params) == jax.tree.structure(fam.params)
