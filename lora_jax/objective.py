"""What a training step minimises and how it moves: token and class cross-entropy (label-smoothed), squared error
for regression, weighted so filler rows count for nothing; the model's forward turned into that loss; AdamW under
the paper's linear schedule."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.methods import unpartition

if TYPE_CHECKING:
    from lora_jax.train import TrainConfig

Batch = Mapping[str, np.ndarray]


def linear_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_steps` (else `warmup_ratio` of the steps), then linear decay to zero (the paper's
    schedule)."""
    warmup = int(config.warmup_ratio * total_steps) if config.warmup_steps is None else config.warmup_steps
    warmup = min(warmup, total_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.lr, max(warmup, 1)),
            optax.linear_schedule(config.lr, 0.0, max(total_steps - warmup, 1)),
        ],
        [warmup],
    )


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (no decay on biases and norms), optional clipping, gradient accumulation over micro-batches."""
    decay_mask = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)
    tx = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm else optax.identity(),
        optax.adamw(linear_schedule(config, total_steps), weight_decay=config.weight_decay, mask=decay_mask),
    )
    return optax.MultiSteps(tx, config.grad_accum) if config.grad_accum > 1 else tx


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Cross-entropy against `optax.smooth_labels(one_hot(labels), smoothing)`: (1 - s) * nll + s * mean over
    classes of -log p, with -log p = logsumexp - logit.

    The label's logit is picked by comparing labels with the class index inside one reduction, not gathered:
    the gradient of a gather is a scatter into a zeroed (tokens, vocab) array, where this one's is an elementwise
    select that fuses with softmax's; on a 49k vocabulary it halves the loss's share of a step on CPU."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    hit = labels[..., None] == jnp.arange(logits.shape[-1], dtype=labels.dtype)
    nll = lse - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    return nll if not smoothing else (1.0 - smoothing) * nll + smoothing * (lse - jnp.mean(logits, axis=-1))


def batch_loss(
    logits: jax.Array, labels: jax.Array, weights: jax.Array, num_labels: int, label_smoothing: float = 0.0
) -> jax.Array:
    """Weighted mean cross-entropy (label-smoothed), or squared error for regression; filler rows have weight 0.

    Labels of shape (batch, length) are target tokens (seq2seq, and causal LMs whose labels are the next tokens,
    lora_jax.causal_lm): cross-entropy averaged over the real target tokens of the batch, positions labelled -100
    skipped, as transformers' seq2seq models compute it.
    """
    logits = logits.astype(jnp.float32)
    if labels.ndim == 2:
        real = (labels != -100) * weights[:, None]
        per_token = smoothed_cross_entropy(logits, jnp.maximum(labels, 0).astype(jnp.int32), label_smoothing)
        return jnp.sum(per_token * real) / jnp.maximum(jnp.sum(real), 1.0)
    if num_labels == 1:
        per_example = jnp.square(logits[:, 0] - labels.astype(jnp.float32))
    else:
        per_example = smoothed_cross_entropy(logits, labels.astype(jnp.int32), label_smoothing)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "decoder_input_ids", "decoder_attention_mask")


def model_inputs(batch: Batch) -> dict[str, Any]:
    """The model's keyword inputs of a batch (labels and weights are the loss's)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def make_loss(module: nn.Module, num_labels: int, label_smoothing: float = 0.0) -> Callable[..., jax.Array]:
    """loss(trainable, frozen, batch, dropout_key): the training loss of one step (shared with lora_jax.sweep)."""

    def loss_fn(trainable: Any, frozen: Any, batch: Batch, dropout_key: jax.Array):
        params = unpartition(trainable, frozen)
        rngs = {"dropout": dropout_key}
        out = module.apply({"params": params}, **model_inputs(batch), deterministic=False, rngs=rngs)
        return batch_loss(out["logits"], batch["labels"], batch["weights"], num_labels, label_smoothing)

    return loss_fn
