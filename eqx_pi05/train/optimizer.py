"""The optimizer, its schedule, and the one function that decides which params train."""

from __future__ import annotations

import re

import equinox as eqx
import jax
import optax
from jaxtyping import PyTree

from eqx_pi05.convert.openpi import leaf_map
from eqx_pi05.model import Pi05
from eqx_pi05.train.config import AdamW, LRSchedule


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


def frozen_paths(model: Pi05) -> set[str]:
    """openpi param paths that openpi's `Pi0Config.get_freeze_filter` freezes, for this config:

    - no LoRA: nothing (full fine-tune);
    - LLM LoRA: `.*llm.*`, except the action expert (`.*llm.*_1.*`) unless it is LoRA too;
    - action expert LoRA only: `.*llm.*_1.*`;
    - any LoRA: never `.*lora.*`.

    As in openpi, the vision tower (`PaliGemma/img`), the action projections and the time MLP stay
    trainable in every case; only the Gemma weights are frozen."""
    cfg = model.config
    llm_lora, expert_lora = cfg.paligemma.lora is not None, cfg.action_expert.lora is not None
    if not (llm_lora or expert_lora):
        return set()
    llm, expert, lora = re.compile(".*llm.*"), re.compile(".*llm.*_1.*"), re.compile(".*lora.*")

    def frozen(path: str) -> bool:
        if llm_lora:
            hit = llm.fullmatch(path) is not None and (expert_lora or expert.fullmatch(path) is None)
        else:
            hit = expert.fullmatch(path) is not None
        return hit and lora.fullmatch(path) is None

    return {path for path, _ in leaf_map(cfg) if frozen(path)}


def trainable_filter(model: Pi05) -> PyTree[bool]:
    """Filter spec over `model`: True on the params that train (use with `eqx.partition`)."""
    frozen = frozen_paths(model)
    getters = [get for path, get in leaf_map(model.config) if path in frozen]
    spec = jax.tree.map(lambda _: True, model)
    return eqx.tree_at(lambda m: [get(m) for get in getters], spec, [False] * len(getters)) if getters else spec
