"""Where arrays live: one data-parallel mesh over every device, parameter shardings (replicated, or FSDP-style
split of big leaves), and batches split by rows -- the only device-layout decisions the training loop makes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Batch = Mapping[str, np.ndarray]


def make_mesh(devices: list | None = None) -> Mesh:
    """One data axis over every device (all hosts)."""
    devices = devices if devices is not None else jax.devices()
    return Mesh(np.asarray(devices), ("data",))


def shardings_for(tree: Any, mesh: Mesh, fsdp: bool) -> Any:
    """Replicated, or (fsdp) each big leaf split on its first axis divisible by the device count."""
    n = mesh.devices.size

    def spec(leaf: jax.Array | np.ndarray) -> NamedSharding:
        shape = np.shape(leaf)
        if fsdp and np.prod(shape, dtype=np.int64) >= 2**14:
            for axis, size in enumerate(shape):
                if size % n == 0:
                    return NamedSharding(mesh, PartitionSpec(*([None] * axis), "data"))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(spec, tree)


def sync_processes(name: str, timeout_s: int = 1800) -> None:
    """Wait until every process reaches this point (a no-op in one process).

    Gloo gives processes 30 s to meet at their first collective, so one still loading or compiling when its peer
    arrives fails the run; the coordination service's barrier has no such limit, so callers meet here first.
    """
    if jax.process_count() > 1:
        from jax._src import distributed  # the coordination-service client has no public accessor

        distributed.global_state.client.wait_at_barrier(f"lora_jax/{name}", timeout_in_ms=timeout_s * 1000)


def place_batch(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
    """Rows split over the data axis. On several hosts each host passes the same global batch and
    contributes its own contiguous block of rows."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    if jax.process_count() == 1:
        return jax.device_put(dict(batch), sharding)
    per_host = len(next(iter(batch.values()))) // jax.process_count()
    start = jax.process_index() * per_host
    return {
        k: jax.make_array_from_process_local_data(sharding, v[start : start + per_host])
        for k, v in batch.items()
    }
