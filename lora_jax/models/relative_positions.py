"""Relative positions as table rows: how T5 and DeBERTa turn a query-key distance into an embedding index.

Both keep short distances exact and share buckets logarithmically among long ones, so one small table covers any
sequence length; they differ in where the log range starts and what happens beyond it. Each function matches its
transformers counterpart index for index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


# T5 (Raffel et al. 2020): a bias per (bucket, head), added to the attention logits.
def relative_position_bucket(
    relative: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """Mesh TensorFlow's buckets: exact for small distances, log-spaced up to max_distance, one bucket beyond."""
    buckets = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = (relative > 0).astype(relative.dtype) * num_buckets
        distance = jnp.abs(relative)
    else:
        distance = -jnp.minimum(relative, 0)  # keys after the query are masked anyway
    max_exact = num_buckets // 2
    # Small distances take the `where`'s other branch, so log(0) here is never used.
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / np.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


# DeBERTa (He et al. 2021): distances index the shared table of 2k relative-position embeddings.
def log_bucket_position(relative: jax.Array, bucket_size: int, max_position: int) -> jax.Array:
    """Keep distances below bucket_size/2 exact; map longer ones logarithmically up to max_position."""
    mid = bucket_size // 2
    sign = jnp.sign(relative)
    near = (relative < mid) & (relative > -mid)
    distance = jnp.where(near, mid - 1, jnp.abs(relative)).astype(jnp.float32)
    log_ratio = jnp.log(distance / mid) / jnp.log(jnp.float32((max_position - 1) / mid))
    log_pos = jnp.ceil(log_ratio * (mid - 1)) + mid
    return jnp.where(distance <= mid, relative, log_pos * sign).astype(jnp.int32)


def relative_positions(length: int, bucket_size: int = -1, max_position: int = -1) -> jax.Array:
    """[length, length] matrix of query index minus key index, log-bucketed when bucket_size > 0."""
    ids = jnp.arange(length)
    relative = ids[:, None] - ids[None, :]
    if bucket_size > 0 and max_position > 0:
        relative = log_bucket_position(relative, bucket_size, max_position)
    return relative.astype(jnp.int32)
