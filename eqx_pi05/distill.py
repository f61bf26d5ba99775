"""Privileged self-distillation and the curriculum (research report §03, mechanism M3).

One model, two observations: the student is `model.velocity` on the wrist-only observation, the
teacher the same call on both cameras, with the same x_t and t (same noise, same time).

    loss = BC(v_student) + lam·mean((v_student − sg(v_teacher))²) + anchor_frac·BC(v_both)

BC(v) = mean((v − u_t)²) over every element, u_t = noise − actions: the mean of openpi's per-sample
`compute_loss`. With lam = anchor_frac = 0 the both-camera forward is not traced at all.

Mixed batches (curriculum, 0 < p < 1): a student row that keeps the camera *is* the both-camera
observation, so its velocity is the live forward v_both the loss computes anyway (self teacher or
anchor). `student_rows` groups the rows by camera set: v_student = where(rows, v_compacted, v_both),
the same function as masking the camera in those rows, at the cost of the compacted wrist-only
forward instead of a second full one (benchmarks/train_step.py measures both).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from eqx_pi05.model import Observation, Pi05


def curriculum_p(step: int, num_steps: int, frac: float) -> float:
    """p(step) = 0.5·(1 − cos(π·clip(step / (frac·num_steps), 0, 1))): 0 at the start, 1 from
    frac·num_steps on (exactly 1.0: cos(π) is −1 in float)."""
    progress = min(max(step / (frac * num_steps), 0.0), 1.0)
    return 0.5 * (1.0 - math.cos(math.pi * progress))


def remove_camera(obs: Observation, slot: str, p: Float[Array, ""], key: PRNGKeyArray) -> Observation:
    """Set `slot`'s image_mask False in each row with probability p (row removed iff u < p, u ~ U[0, 1)).
    p = 0 keeps every row as it was; a row already masked stays masked."""
    if slot not in obs.image_masks:
        raise KeyError(f"remove_camera: slot {slot!r} is not in the observation (it has {sorted(obs.image_masks)})")
    removed = removed_rows(key, p, obs.image_masks[slot].shape[0])
    return eqx.tree_at(lambda o: o.image_masks[slot], obs, obs.image_masks[slot] & ~removed)


def removed_rows(key: PRNGKeyArray, p: Float[Array, ""], batch: int) -> Bool[Array, " b"]:
    """The per-row draw of the in-loss removal: row i loses the camera iff u_i < p, u ~ U[0, 1)."""
    return jax.random.uniform(key, (batch,)) < p


def has_live_forward(lam: float, anchor_frac: float, teacher: Pi05 | None) -> bool:
    """Whether `distill_loss` computes the live both-camera forward (self-teacher target or anchor)."""
    return (lam > 0 and teacher is None) or anchor_frac > 0


def drop_camera(obs: Observation, slot: str) -> Observation:
    """The observation without `slot`: the same function as its mask False in every row (positions
    come from the cumsum of the valid mask), without computing its image tower and tokens."""
    if slot not in obs.images:
        raise KeyError(f"drop_camera: slot {slot!r} is not in the observation (it has {sorted(obs.images)})")
    keep = [k for k in obs.images if k != slot]
    return Observation(
        images={k: obs.images[k] for k in keep},
        image_masks={k: obs.image_masks[k] for k in keep},
        state=obs.state,
        tokenized_prompt=obs.tokenized_prompt,
        tokenized_prompt_mask=obs.tokenized_prompt_mask,
    )


def _mse(a: Float[Array, "b h a"], b: Float[Array, "b h a"]) -> Float[Array, ""]:
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def distill_loss(
    model: Pi05,
    obs_both: Observation,
    obs_student: Observation,
    actions: Float[Array, "b h a"],
    noise: Float[Array, "b h a"],
    t: Float[Array, " b"],
    *,
    lam: float,
    anchor_frac: float,
    teacher: Pi05 | None = None,
    student_rows: Bool[Array, " b"] | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """(loss, {bc, distill, anchor}). `lam`, `anchor_frac` are Python floats: a zero term is not traced.

    teacher None (mode `self`): one live both-camera forward v_both; the distillation target is
    sg(v_both) and the anchor BC(v_both) keeps its gradient. A teacher model (modes `ema`,
    `checkpoint`): the target is sg(teacher(obs_both)) and the anchor, if any, is a separate live
    both-camera forward (BC of a frozen teacher would have no gradient).

    `student_rows` (grouped mixed batch): `obs_student` is the compacted observation of the rows
    marked True; the other rows' student is `obs_both`, i.e. the live forward (which must exist:
    `has_live_forward`). None: `obs_student` is every row's student.
    """
    tt = t[:, None, None]
    x_t = tt * noise + (1 - tt) * actions
    u_t = noise - actions
    live = has_live_forward(lam, anchor_frac, teacher)
    if student_rows is not None and not live:
        raise ValueError("distill_loss: student_rows needs the live both-camera forward (a self teacher with lam > 0, "
                         "or anchor_frac > 0); mask the camera per row instead")
    v_live = model.velocity(obs_both, x_t, t) if live else None
    v_student = model.velocity(obs_student, x_t, t)
    if student_rows is not None:
        v_student = jnp.where(student_rows[:, None, None], v_student, v_live)
    zero = jnp.zeros((), jnp.float32)
    terms = {"bc": _mse(v_student, u_t), "distill": zero, "anchor": zero}
    if lam == 0 and anchor_frac == 0:
        return terms["bc"], terms
    if lam > 0:
        v_teacher = v_live if teacher is None else teacher.velocity(obs_both, x_t, t)
        terms["distill"] = _mse(v_student, jax.lax.stop_gradient(v_teacher))
    if anchor_frac > 0:
        terms["anchor"] = _mse(v_live, u_t)
    return terms["bc"] + lam * terms["distill"] + anchor_frac * terms["anchor"], terms
