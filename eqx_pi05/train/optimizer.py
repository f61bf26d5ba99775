"""The optimizer and its schedule (which params it sees: `eqx_pi05.trainable`)."""

from __future__ import annotations

import optax

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
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_gradient_norm),
        optax.adamw(lr_schedule(lr), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )
