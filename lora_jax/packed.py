"""Training K LoRA adapters of one frozen base in one jitted step: a sweep over seeds, learning rates, alphas and
ranks as one program.

The K adapters are an adapter bank's stack (`lora_jax.bank`): A (K, d_in, r_max) and B (K, r_max, d_out) per
kernel, a scale per adapter (its alpha), each rank padded to r_max. The step vmaps one adapter's ordinary
LoRA step over the K axis, with each adapter's own batch, dropout key and learning rate, so the frozen base is
read once per step for all K (its weights are not copied K times). A padded rank (or a kernel an adapter does not
target) is masked out of the gradient and out of the optimizer's update, so its slots stay exactly zero and the
real slots follow the same arithmetic as K separate runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax import bank as lb
from lora_jax.lora import LORA_A, LORA_B, LORA_SCALE, LORA_SLICE
from lora_jax.tree import Params, combine, filter_leaves

# loss_fn(params, batch, rng) -> scalar loss, for one adapter's params (the base plus 2-D LoRA leaves)
LossFn = Callable[[Params, Any, jax.Array], jax.Array]


class Packed(NamedTuple):
    """What a packed step reads and writes; every leaf but `base` has a leading K axis."""

    trainable: Params  # lora_a / lora_b stacks
    opt_state: Any  # one optimizer state per adapter (vmapped)
    frozen: Params  # lora_scale (per adapter) / lora_slice stacks
    mask: Params  # 1 on an adapter's real rank slots, 0 on padding and on kernels it does not target
    base: Params


def _is_factor(path: str) -> bool:
    name = path.rsplit(".", 1)[-1]
    return name.startswith((LORA_A, LORA_B))


def pack(
    base: Params, adapters: Sequence[Params], learning_rates: Sequence[float], optimizer: Callable[..., Any]
) -> Packed:
    """K adapters (lora_params of lora_wrap'd params, each with its own seed, rank and alpha) ready to train.

    optimizer: an optax constructor taking `learning_rate` (e.g. optax.adamw); each adapter gets its own rate.
    """
    if len(adapters) != len(learning_rates):
        raise ValueError(f"{len(adapters)} adapters but {len(learning_rates)} learning rates; give one rate each.")
    bank = lb.new_bank(base, capacity=len(adapters), r_max=1)
    for i, adapter in enumerate(adapters):
        bank = lb.add(bank, str(i), adapter)
    mask: dict[str, Any] = {}
    for (module, suffix), stacked in lb.targets_of(bank.stack).items():
        a = np.zeros(stacked["a"].shape, np.float32)
        b = np.zeros(stacked["b"].shape, np.float32)
        for i in range(len(adapters)):
            r = bank.ranks[str(i)].get((module, suffix), 0)
            a[i, :, :r], b[i, :r] = 1.0, 1.0
        mask[f"{module}.{LORA_A}{suffix}"], mask[f"{module}.{LORA_B}{suffix}"] = jnp.asarray(a), jnp.asarray(b)
    trainable = filter_leaves(bank.stack, _is_factor)
    frozen = filter_leaves(bank.stack, lambda p: not _is_factor(p))
    # A fused slice's position is one shared scalar in the bank; give it the K axis too, so all of frozen vmaps.
    frozen = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(adapters),)) if x.ndim == 0 else x, frozen)
    lrs = jnp.asarray(learning_rates, jnp.float32)
    opt_state = jax.vmap(lambda t, lr: optax.inject_hyperparams(optimizer)(learning_rate=lr).init(t))(trainable, lrs)
    return Packed(trainable, opt_state, frozen, lb.nest(mask), bank.base)


def unpack(packed: Packed, index: int, like: Params) -> dict[str, Any]:
    """Adapter `index`'s trained LoRA leaves, at the targets and true ranks of `like` (e.g. what was packed)."""
    stacked = lb.targets_of(combine(packed.trainable, packed.frozen))
    leaves = {}
    for (module, suffix), mine in lb.targets_of(like).items():
        r, there = np.shape(mine["a"])[1], stacked[module, suffix]
        leaves[f"{module}.{LORA_A}{suffix}"] = there["a"][index, :, :r]
        leaves[f"{module}.{LORA_B}{suffix}"] = there["b"][index, :r]
        leaves[f"{module}.{LORA_SCALE}{suffix}"] = there["scale"][index]
        if suffix:
            leaves[f"{module}.{LORA_SLICE}{suffix}"] = there["slice"][index]
    return lb.nest(leaves)


def packed_step(loss_fn: LossFn, optimizer: Callable[..., Any]) -> Callable[..., tuple[Packed, jax.Array]]:
    """A jitted `(packed, batches, rngs) -> (packed, losses)`; batches and rngs have a leading K axis."""
    tx = optax.inject_hyperparams(optimizer)(learning_rate=0.0)  # each state carries its own rate

    def one(trainable, opt_state, frozen, mask, base, batch, rng):
        def loss_of(t):
            return loss_fn(combine(base, combine(t, frozen)), batch, rng)

        loss, grads = jax.value_and_grad(loss_of)(trainable)
        grads = jax.tree.map(jnp.multiply, grads, mask)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        updates = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, mask)
        return optax.apply_updates(trainable, updates), opt_state, loss

    @jax.jit
    def step(packed: Packed, batches: Any, rngs: jax.Array) -> tuple[Packed, jax.Array]:
        vmapped = jax.vmap(one, in_axes=(0, 0, 0, 0, None, 0, 0))
        trainable, opt_state, losses = vmapped(
            packed.trainable, packed.opt_state, packed.frozen, packed.mask, packed.base, batches, rngs
        )
        return packed._replace(trainable=trainable, opt_state=opt_state), losses

    return step
