"""lora_jax.sharding: batches split by rows over the data axis, parameters replicated or FSDP-split."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from lora_jax.data.batching import eval_batches
from lora_jax.sharding import make_mesh, place_batch, shardings_for
from tests.test_batching import fake_dataset


def test_make_mesh_spans_every_device_on_one_data_axis() -> None:
    mesh = make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == len(jax.devices())


def test_shardings_replicate_small_leaves_and_split_big_ones_only_with_fsdp() -> None:
    mesh = make_mesh()
    tree = {"big": np.zeros((256, 128)), "small": np.zeros((8,)), "odd": np.zeros((3, 2**14))}
    replicated = shardings_for(tree, mesh, fsdp=False)
    assert all(s.spec == PartitionSpec() for s in jax.tree.leaves(replicated))
    split = shardings_for(tree, mesh, fsdp=True)
    assert split["big"].spec == PartitionSpec("data")
    assert split["small"].spec == PartitionSpec()
    assert split["odd"].spec == PartitionSpec("data")  # one device divides every axis: the first is split


def test_place_batch_single_device() -> None:
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    batch = next(eval_batches(fake_dataset(n=8), 8))
    sharded = place_batch(batch, mesh)
    assert sharded.keys() == batch.keys()
    for key, value in sharded.items():
        np.testing.assert_array_equal(np.asarray(value), batch[key])
        assert value.sharding.spec == jax.sharding.PartitionSpec("data")


@pytest.mark.slow
def test_place_batch_splits_rows_over_devices() -> None:
    """Four fake CPU devices (a fresh process: the device count is fixed when jax starts)."""
    script = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, numpy as np
        from jax.sharding import Mesh
        from lora_jax.data.batching import eval_batches
        from lora_jax.sharding import place_batch
        mask = np.ones((10, 8), np.int32)
        data = {"input_ids": np.arange(80, dtype=np.int32).reshape(10, 8), "attention_mask": mask,
                "labels": np.arange(10)}
        mesh = Mesh(np.array(jax.devices()), ("data",))
        batch = next(eval_batches(data, 6, num_devices=4))
        sharded = place_batch(batch, mesh)
        shards = sharded["input_ids"].addressable_shards
        assert len(jax.devices()) == 4 and len(shards) == 4
        assert all(s.data.shape == (2, 8) for s in shards)
        rows = np.concatenate([np.asarray(s.data) for s in shards])
        np.testing.assert_array_equal(rows, batch["input_ids"])
        from lora_jax.sharding import shardings_for
        split = shardings_for({"odd": np.zeros((3, 2**14)), "big": np.zeros((8, 4096))}, mesh, fsdp=True)
        assert split["odd"].spec == jax.sharding.PartitionSpec(None, "data")  # 3 rows do not split over 4
        assert split["big"].spec == jax.sharding.PartitionSpec("data")
        print("ok", batch["weights"].tolist())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "ok [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]"
