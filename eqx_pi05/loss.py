"""The training loss: flow-matching BC, privileged self-distillation, the anchor, the curriculum and
the student's camera set (research report §03, mechanism M3). Every variant trains through
`train_loss`; without distillation it is plain BC.

One model, two observations: the student is `model.velocity` on the observation without its camera,
the teacher the same call on both cameras, with the same x_t and t (same noise, same time).

    loss = BC(v_student) + lam·mean((v_student − sg(v_teacher))²) + anchor_frac·BC(v_both)

BC(v) = mean((v − u_t)²) over every element, u_t = noise − actions: the mean of openpi's per-sample
`compute_loss` (`bc_per_sample`). With lam = anchor_frac = 0 the both-camera forward is not traced.

Mixed batches (curriculum, 0 < p < 1): a student row that keeps the camera *is* the both-camera
observation, so its velocity is the live forward v_both the loss computes anyway (self teacher or
anchor). `select_student` groups the rows by camera set: v_student = where(rows, v_compacted, v_both),
the same function as masking the camera in those rows, at the cost of the compacted wrist-only
forward instead of a second full one (benchmarks/train_step.py measures both).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from eqx_pi05 import cameras
from eqx_pi05.model import Observation, Pi05

Teacher = Literal["self", "ema", "checkpoint"]


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The report's in-loss mechanism (M3): the student is the model with `camera` removed per
    sample with probability p(step); the teacher is a both-camera forward with the same noise and time.

        loss = BC(v_student) + lam·mean((v_student − sg(v_teacher))²) + anchor_frac·BC(v_both)

    p(step): `schedule="constant"` uses `p`; `schedule="curriculum"` is
    0.5·(1 − cos(π·clip(step / (curriculum_frac·N), 0, 1))). Teacher: `self` (the live params,
    v_teacher = sg of the live both-camera forward, whose un-stopped value is the anchor's),
    `ema` (the EMA params), `checkpoint` (frozen params read from `teacher_checkpoint`). In the
    `ema`/`checkpoint` modes the anchor is the live model's both-camera forward (a teacher with frozen
    params would give the anchor no gradient at all).
    """

    lam: float | None = None
    anchor_frac: float | None = None
    schedule: Literal["constant", "curriculum"] | None = None
    p: float | None = None  # schedule "constant" only
    curriculum_frac: float | None = None  # schedule "curriculum" only (the report: 0.75)
    teacher: Teacher | None = None  # required when lam > 0 or anchor_frac > 0
    teacher_checkpoint: pathlib.Path | None = None  # teacher "checkpoint" only: an openpi params dir
    camera: cameras.Camera = "agentview"  # the camera the student loses

    def __post_init__(self):
        for name in ("lam", "anchor_frac", "schedule"):
            if getattr(self, name) is None:
                raise ValueError(f"distill.{name}: required for a distillation config, got None (no silent default; "
                                 "lam=0 and anchor_frac=0 give the in-loss removal without a teacher)")
        if self.lam < 0 or self.anchor_frac < 0:
            raise ValueError(f"distill.lam and distill.anchor_frac: expected >= 0, got {self.lam} and {self.anchor_frac}")
        if self.schedule == "constant":
            if self.p is None or not 0.0 <= self.p <= 1.0:
                raise ValueError(f"distill.p: schedule 'constant' needs a probability in [0, 1], got {self.p}")
            if self.curriculum_frac is not None:
                raise ValueError(f"distill.curriculum_frac={self.curriculum_frac} with distill.schedule='constant': "
                                 "the curriculum fraction is only read by schedule 'curriculum'; set one")
        else:
            if self.curriculum_frac is None or not 0.0 < self.curriculum_frac <= 1.0:
                raise ValueError(f"distill.curriculum_frac: schedule 'curriculum' needs a value in (0, 1], got {self.curriculum_frac}")
            if self.p is not None:
                raise ValueError(f"distill.p={self.p} with distill.schedule='curriculum': p(step) comes from "
                                 "distill.curriculum_frac; set distill.p only with schedule 'constant'")
        if self.uses_teacher and self.teacher is None:
            raise ValueError(f"distill.teacher: required when distill.lam ({self.lam}) or distill.anchor_frac "
                             f"({self.anchor_frac}) > 0; expected one of self, ema, checkpoint")
        if not self.uses_teacher and self.teacher is not None:
            raise ValueError(f"distill.teacher={self.teacher!r} with distill.lam=0 and distill.anchor_frac=0: "
                             "no term reads the teacher; set distill.teacher to None")
        if (self.teacher == "checkpoint") != (self.teacher_checkpoint is not None):
            raise ValueError(f"distill.teacher={self.teacher!r} and distill.teacher_checkpoint={self.teacher_checkpoint}: "
                             "a checkpoint teacher needs a path, and a path needs teacher 'checkpoint'")

    def p_at(self, step: int, num_steps: int) -> float:
        """Probability that a sample's student loses its camera at `step` (0-based) of `num_steps`."""
        return self.p if self.schedule == "constant" else curriculum_p(step, num_steps, self.curriculum_frac)

    @property
    def uses_teacher(self) -> bool:
        return self.lam > 0 or self.anchor_frac > 0

    @property
    def slot(self) -> str:
        return cameras.slot(self.camera)


def curriculum_p(step: int, num_steps: int, frac: float) -> float:
    """p(step) = 0.5·(1 − cos(π·clip(step / (frac·num_steps), 0, 1))): 0 at the start, 1 from
    frac·num_steps on (exactly 1.0: cos(π) is −1 in float)."""
    progress = min(max(step / (frac * num_steps), 0.0), 1.0)
    return 0.5 * (1.0 - math.cos(math.pi * progress))


def flow_matching(
    actions: Float[Array, "b h a"], noise: Float[Array, "b h a"], t: Float[Array, " b"]
) -> tuple[Float[Array, "b h a"], Float[Array, "b h a"]]:
    """(x_t, u_t): x_t = t·noise + (1−t)·actions (t=1 is noise), target u_t = noise − actions (openpi)."""
    tt = t[:, None, None]
    return tt * noise + (1 - tt) * actions, noise - actions


def bc_per_sample(
    model: Pi05, obs: Observation, actions: Float[Array, "b h a"], noise: Float[Array, "b h a"], t: Float[Array, " b"]
) -> Float[Array, "b h"]:
    """openpi's `compute_loss`: mean((v − u_t)², axis=-1) per sample and step, for given noise and time."""
    x_t, u_t = flow_matching(actions, noise, t)
    return jnp.mean(jnp.square(model.velocity(obs, x_t, t) - u_t), axis=-1)


def removed_rows(key: PRNGKeyArray, p: Float[Array, ""], batch: int) -> Bool[Array, " b"]:
    """The per-row draw of the in-loss removal: row i loses the camera iff u_i < p, u ~ U[0, 1)."""
    return jax.random.uniform(key, (batch,)) < p


def has_live_forward(lam: float, anchor_frac: float, teacher: Pi05 | None) -> bool:
    """Whether `train_loss` computes the live both-camera forward (self-teacher target or anchor)."""
    return (lam > 0 and teacher is None) or anchor_frac > 0


def select_student(
    obs: Observation, slot: str | None, p: Float[Array, ""], key: PRNGKeyArray, *, drop: bool, group: bool
) -> tuple[Observation, Bool[Array, " b"] | None]:
    """(student observation, student_rows) for `train_loss`. `slot` None: no in-loss removal, the
    student is `obs`. `drop` (p = 1): every row loses `slot`, compacted. Otherwise rows lose it with
    probability p: `group` (only where the loss has the live both-camera forward) returns the
    compacted observation and the rows that use it, else the camera is masked per row."""
    if slot is None:
        return obs, None
    if drop:
        return cameras.drop(obs, [slot]), None
    rows = removed_rows(key, p, obs.image_masks[slot].shape[0])
    if group:
        return cameras.drop(obs, [slot]), rows
    return cameras.mask(obs, [slot], rows), None


def _mse(a: Float[Array, "b h a"], b: Float[Array, "b h a"]) -> Float[Array, ""]:
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def train_loss(
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
    x_t, u_t = flow_matching(actions, noise, t)
    live = has_live_forward(lam, anchor_frac, teacher)
    if student_rows is not None and not live:
        raise ValueError("train_loss: student_rows needs the live both-camera forward (a self teacher with lam > 0, "
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
