"""The optimizer and its schedule (which params it sees: `eqx_pi05.trainable`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jaxtyping import PyTree

from eqx_pi05.variants import AdamW, LRSchedule


def lr_schedule(cfg: LRSchedule) -> optax.Schedule:
    """openpi's CosineDecaySchedule (init value peak/(warmup+1), as there)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.peak_lr / (cfg.warmup_steps + 1),
        peak_value=cfg.peak_lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.decay_steps,
        end_value=cfg.decay_lr,
    )


def make_optimizer(lr: LRSchedule, cfg: AdamW) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with weight decay on every trainable param (openpi's AdamW)."""
    return optax.chain(optax.clip_by_global_norm(cfg.clip_gradient_norm), _adamw(lr, cfg))


def _adamw(lr: LRSchedule, cfg: AdamW) -> optax.GradientTransformation:
    return optax.adamw(lr_schedule(lr), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mu_dtype=cfg.mu_dtype)


def apply_optimizer(
    lr: LRSchedule, cfg: AdamW, grads: PyTree, opt_state: PyTree, params: PyTree, ema: PyTree | None, ema_decay: float | None
) -> tuple[PyTree, PyTree, PyTree | None, jax.Array]:
    """(params, opt_state, ema, gradient norm) after one step of `make_optimizer` and the EMA update,
    computed leaf by leaf into the donated state: the clip needs the global norm first, the rest is
    elementwise, so each leaf's clip, AdamW update, apply and EMA run one after the other (ordered by
    optimization barriers), and no second gradient-sized buffer exists. Formulated as optax's
    tree-wide chain, XLA holds the gradients and the clipped gradients (g / norm) at once: 6.2 GiB
    more at full size (benchmarks/train_step.py). The same arithmetic as `optax.apply_updates(params,
    make_optimizer(...).update(...))` and `state.ema_update` (optax's own AdamW runs on each leaf), but
    the clip as one factor max/norm (≤ 1 ulp from optax's g / norm · max); `opt_state` keeps
    `make_optimizer`'s structure, so checkpoints are unchanged."""
    clip_state, (adam, decay_state, schedule) = opt_state
    adamw = _adamw(lr, cfg)
    g_norm = optax.tree.norm(grads)
    # optax.clip_by_global_norm as one factor: its select(norm < max, g, g / norm * max) has XLA
    # materialise g / norm beside g (below the threshold the same bits; above, ≤ 1 ulp apart).
    clip = jnp.where(g_norm < cfg.clip_gradient_norm, 1.0, cfg.clip_gradient_norm / g_norm)
    leaves, treedef = jax.tree.flatten(params)
    per_leaf = [jax.tree.leaves(t) for t in (grads, adam.mu, adam.nu)]
    emas = jax.tree.leaves(ema) if ema is not None else [None] * len(leaves)
    out, prev, count, sched = [], None, adam.count, schedule
    for p, g, mu, nu, e in zip(leaves, *per_leaf, emas):
        if prev is not None:  # this leaf's work starts after the previous leaf's outputs exist
            (p, g, mu, nu, e), _ = jax.lax.optimization_barrier(((p, g, mu, nu, e), prev))
        g = g * clip.astype(g.dtype)
        u, (a, _, sched) = adamw.update(g, (optax.ScaleByAdamState(adam.count, mu, nu), decay_state, schedule), p)
        p = optax.apply_updates(p, u)
        e = None if e is None else ema_decay * e + (1 - ema_decay) * p  # eqx_pi05.train.state.ema_update
        count, prev = a.count, (p, a.mu, a.nu, e)
        out.append(prev)
    new_params, mu, nu, new_ema = ([o[i] for o in out] for i in range(4))
    adam = optax.ScaleByAdamState(count, jax.tree.unflatten(treedef, mu), jax.tree.unflatten(treedef, nu))
    ema = None if ema is None else jax.tree.unflatten(treedef, new_ema)
    return jax.tree.unflatten(treedef, new_params), (clip_state, (adam, decay_state, sched)), ema, g_norm

