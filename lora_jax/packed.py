"""Training K LoRA adapters of one frozen base in one jitted step: a sweep over seeds, learning rates, alphas and
ranks as one program.

The K adapters are an adapter bank's stack (`lora_jax.bank`): A (K, d_in, r_max) and B (K, r_max, d_out) per
kernel, a scale per adapter (its alpha), each rank padded to r_max. The step vmaps one adapter's ordinary
LoRA step (`masked_update`) over the K axis, with each adapter's own batch, dropout key and learning rate, so the
frozen base is read once per step for all K (its weights are not copied K times). A padded rank (or a kernel an
adapter does not target) is masked out of the gradient and out of the optimizer's update, so its slots stay
exactly zero and the real slots follow the same arithmetic as K separate runs. Each adapter's learning rate
scales the update of an optimizer built at rate 1 (for AdamW the same arithmetic as building it at that rate), so
one optimizer serves all K. `lora_jax.sweep` trains a Hydra multirun through the same `masked_update`.
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
    learning_rates: jax.Array  # (K,)


def _is_factor(path: str) -> bool:
    name = path.rsplit(".", 1)[-1]
    return name.startswith((LORA_A, LORA_B))


def pack(
    base: Params, adapters: Sequence[Params], learning_rates: Sequence[float], optimizer: Callable[..., Any]
) -> Packed:
    """K adapters (lora_params of lora_wrap'd params, each with its own seed, rank and alpha) ready to train.

    optimizer: an optax constructor taking `learning_rate` (e.g. optax.adamw), built once at rate 1; each adapter's
    rate scales its updates.
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
    opt_state = jax.vmap(optimizer(learning_rate=1.0).init)(trainable)
    return Packed(trainable, opt_state, frozen, lb.nest(mask), bank.base, jnp.asarray(learning_rates, jnp.float32))


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


def masked_update(loss_fn: Callable[..., jax.Array], tx: optax.GradientTransformation) -> Callable[..., tuple]:
    """One adapter's step, to be vmapped over K: `(trainable, opt_state, mask, lr, active, *loss_args) ->
    (trainable, opt_state, loss)`, for `loss_fn(trainable, *loss_args)`.

    The gradient and the update are zero where `mask` is (padded rank slots stay exactly zero); `lr` scales the
    update of `tx` (built at rate 1); `active` False keeps the old trainable and state (a run with no batch this
    step), None means always active.
    """

    def update(
        trainable: Params, opt_state: optax.OptState, mask: Params, lr: jax.Array, active: jax.Array | None, *loss_args
    ):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, *loss_args)
        grads = jax.tree.map(lambda g, m: g * m.astype(g.dtype), grads, mask)
        updates, new_opt_state = tx.update(grads, opt_state, trainable)
        updates = jax.tree.map(lambda u, m: u * (m * lr).astype(u.dtype), updates, mask)
        new_trainable = optax.apply_updates(trainable, updates)
        if active is None:
            return new_trainable, new_opt_state, loss
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)  # noqa: E731
        return keep(new_trainable, trainable), keep(new_opt_state, opt_state), loss

    return update


def packed_step(loss_fn: LossFn, optimizer: Callable[..., Any]) -> Callable[..., tuple[Packed, jax.Array]]:
    """A jitted `(packed, batches, rngs) -> (packed, losses)`; batches and rngs have a leading K axis."""
    update = masked_update(lambda t, frozen, base, batch, rng: loss_fn(combine(base, combine(t, frozen)), batch, rng),
                           optimizer(learning_rate=1.0))  # fmt: skip

    @jax.jit
    def step(packed: Packed, batches: Any, rngs: jax.Array) -> tuple[Packed, jax.Array]:
        vmapped = jax.vmap(update, in_axes=(0, 0, 0, 0, None, 0, None, 0, 0))
        trainable, opt_state, losses = vmapped(
            packed.trainable, packed.opt_state, packed.mask, packed.learning_rates, None, packed.frozen, packed.base,
            batches, rngs,
        )  # fmt: skip
        return packed._replace(trainable=trainable, opt_state=opt_state), losses

    return step
