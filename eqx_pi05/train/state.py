"""The train state: trainable and frozen params, optimizer state, EMA, step and RNG, one pytree."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PyTree, UInt32

from eqx_pi05.model import Pi05
from eqx_pi05.trainable import trainable_filter


class TrainState(eqx.Module):
    step: Int[Array, ""]
    params: Pi05  # trainable leaves (None where frozen), float32
    frozen: Pi05  # frozen leaves (None where trainable), stored in the compute dtype as openpi does
    opt_state: PyTree
    ema: Pi05 | None  # EMA of `params`; frozen leaves are their own average, so they are not copied
    rng: UInt32[Array, "..."]  # key data of the run's base key; step keys are fold_in(base, step)

    def model(self) -> Pi05:
        return eqx.combine(self.params, self.frozen)

    def ema_model(self) -> Pi05:
        if self.ema is None:
            raise ValueError("this run keeps no EMA (ema_decay=None)")
        return eqx.combine(self.ema, self.frozen)


def split_model(model: Pi05) -> tuple[Pi05, Pi05]:
    """(trainable, frozen) by `trainable_filter`; frozen leaves cast to the model's compute dtype."""
    params, frozen = eqx.partition(model, trainable_filter(model))
    frozen = jax.tree.map(lambda x: x.astype(model.config.dtype), frozen)
    return params, frozen


def init_state(model: Pi05, optimizer: optax.GradientTransformation, *, ema: bool, seed: int) -> TrainState:
    params, frozen = split_model(model)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=frozen,
        opt_state=optimizer.init(params),
        ema=jax.tree.map(jnp.copy, params) if ema else None,  # its own buffers: the state is donated
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def ema_update(ema: PyTree, params: PyTree, decay: float) -> PyTree:
    """ema ← decay·ema + (1 − decay)·params, leaf by leaf (openpi's order of operations)."""
    return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)

