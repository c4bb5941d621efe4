"""Adapter-only save/load: round trip, checksum, mismatched base."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lora_jax.adapters import CONFIG, TENSORS, load_adapter, load_adapter_config, save_adapter
from lora_jax.lora import LoraConfig, LoraError, lora_wrap
from lora_jax.tree import leaf_paths
from tests.test_lora import perturb_lora_b
from tests.tiny import tiny

CONFIG_QV = LoraConfig(r=4, alpha=8, targets=("query", "value"), train_also=("classifier",))


def test_round_trip_restores_outputs_and_writes_only_the_adapter(tmp_path):
    model, params, x = tiny()
    trained = perturb_lora_b(lora_wrap(params, CONFIG_QV, jax.random.key(1)))
    trained["params"]["classifier"]["bias"] = trained["params"]["classifier"]["bias"] + 1.0
    save_adapter(tmp_path, trained, CONFIG_QV)
    loaded, config = load_adapter(tmp_path, params)
    assert config == CONFIG_QV == load_adapter_config(tmp_path)
    np.testing.assert_array_equal(model.apply(loaded, x), model.apply(trained, x))
    saved = json.loads((tmp_path / CONFIG).read_text())["shapes"]
    assert all(".lora_" in k or ".classifier." in k for k in saved)
    assert not any(k.endswith("key.kernel") for k in saved)


def test_corrupted_file_is_refused(tmp_path):
    _, params, _ = tiny()
    save_adapter(tmp_path, lora_wrap(params, CONFIG_QV, jax.random.key(1)), CONFIG_QV)
    data = bytearray((tmp_path / TENSORS).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / TENSORS).write_bytes(bytes(data))
    with pytest.raises(LoraError, match="corrupted"):
        load_adapter(tmp_path, params)


def test_mismatched_base_is_refused(tmp_path):
    _, params, _ = tiny(width=16)
    save_adapter(tmp_path, lora_wrap(params, CONFIG_QV, jax.random.key(1)), CONFIG_QV)
    _, wider, _ = tiny(width=24)
    with pytest.raises(LoraError, match="wrong base model"):
        load_adapter(tmp_path, wider)
    _, shallow, _ = tiny(depth=1)
    with pytest.raises(LoraError, match="layer_1.query.kernel in the base params"):
        load_adapter(tmp_path, shallow)


def test_missing_adapter_and_unwrapped_params(tmp_path):
    _, params, _ = tiny()
    with pytest.raises(LoraError, match="No adapter in"):
        load_adapter(tmp_path, params)
    with pytest.raises(LoraError, match="call lora_wrap before save_adapter"):
        save_adapter(tmp_path, params, CONFIG_QV)


def test_save_leaves_no_temporary_files(tmp_path):
    _, params, _ = tiny()
    wrapped = lora_wrap(params, CONFIG_QV, jax.random.key(1))
    save_adapter(tmp_path, wrapped, CONFIG_QV)
    save_adapter(tmp_path, wrapped, CONFIG_QV)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG, TENSORS])
    assert len(leaf_paths(load_adapter(tmp_path, params)[0])) == len(leaf_paths(wrapped))
