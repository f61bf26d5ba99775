"""One training step: augment, sample noise and time, student/teacher loss, clip + AdamW, EMA.

The step is one module-level `jax.jit` (`jit_train_step`) with the train state, the batch and the
teacher params sharded at its boundary (`eqx_pi05.train.sharding`) and the state donated. What it
computes is fixed by a hashable `StepConfig` and by `drop_student` (static): p(step) = 1 means the
student's camera leaves the observation (compacted, its tokens never computed). p < 1 draws the
removed rows inside the step; when the loss computes the live both-camera forward anyway, the rows
are grouped by camera set (the compacted student forward, selected per row against the live one:
`loss.select_student`), else the camera is masked per row.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

from eqx_pi05.augment import augment
from eqx_pi05.loss import DistillConfig, has_live_forward, select_student, train_loss
from eqx_pi05.model import Observation, Pi05, sample_noise_and_time
from eqx_pi05.variants import AdamW, LRSchedule, TrainConfig
from eqx_pi05.train.optimizer import apply_optimizer, lr_schedule
from eqx_pi05.train.sharding import batch_sharding, fsdp_shardings, replicated
from eqx_pi05.train.state import TrainState, ema_update

# XLA options for programs whose compile time matters more than their run time (init, short CPU runs).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything the compiled step depends on; equal configs share one compiled program."""

    lr: LRSchedule
    optimizer: AdamW
    ema_decay: float | None
    augment: bool
    augment_black_frames: bool = True  # False: all-black frames (view_dropout's zeros) skip the augmentation
    distill: DistillConfig | None = None  # None: plain BC, no in-loss removal
    fast_compile: bool = False  # XLA backend optimisations off (see TrainConfig.xla_fast_compile)
    # p < 1: group the student's rows by camera set where exact and cheaper (the loss has the live
    # both-camera forward); False masks the camera per row everywhere (the reference formulation).
    group_student: bool = True
    grad_accum_steps: int = 1  # the batch's gradient as the mean over this many micro-batches (memory of one)
    ema_on_host: bool = False  # the EMA in pinned host memory, updated after the step (`jit_train_step`)

    @staticmethod
    def of(cfg: TrainConfig) -> StepConfig:
        return StepConfig(lr=cfg.lr, optimizer=cfg.optimizer, ema_decay=cfg.ema_decay, augment=cfg.augment,
                          augment_black_frames=cfg.augment_black_frames, distill=cfg.distill,
                          fast_compile=cfg.xla_fast_compile, grad_accum_steps=cfg.grad_accum_steps,
                          ema_on_host=cfg.ema_memory == "host")


def drops_student(cfg: StepConfig, p: float) -> bool:
    """The step's static `drop_student` at probability p: the wrist-only student program at p = 1,
    except where the p < 1 program already groups the rows (the loss has the live both-camera
    forward): at p = 1 every row takes its wrist-only forward, the same function at the same cost,
    so a curriculum reaching p = 1 keeps its program instead of compiling a second one."""
    d = cfg.distill
    if d is None or p < 1.0:
        return False
    live = (d.lam > 0 and d.teacher == "self") or d.anchor_frac > 0  # loss.has_live_forward of the step's teacher
    return not (cfg.group_student and live)


def loss_and_grads(
    state: TrainState,
    batch: dict,
    p: Float[Array, ""],
    teacher: Pi05 | None,
    drop_student: bool,
    cfg: StepConfig,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]], PyTree]:
    """(loss, {bc, distill, anchor}, grads w.r.t. `state.params`) of the step's batch.

    `batch`: the pipeline's dict (uint8 images; an absent slot is a removed camera). `p`: probability
    that a sample's student loses its camera (`drop_student`: all of them, compacted).
    `teacher`: the frozen checkpoint teacher (mode `checkpoint`), else None."""
    k_augment, k_noise, k_student = step_keys(state)
    obs = Observation.from_batch(batch)
    if cfg.augment:
        obs = augment(k_augment, obs, keep_black=not cfg.augment_black_frames)
    actions = jnp.asarray(batch["actions"], jnp.float32)
    noise, t = sample_noise_and_time(k_noise, actions.shape)
    d = cfg.distill
    lam, anchor_frac = (0.0, 0.0) if d is None else (d.lam, d.anchor_frac)
    if d is not None and d.teacher == "ema":
        teacher = state.ema_model()
    elif d is None or d.teacher != "checkpoint":
        teacher = None  # self: the live model's both-camera forward
    group = cfg.group_student and has_live_forward(lam, anchor_frac, teacher)
    student, rows = select_student(obs, None if d is None else d.slot, p, k_student, drop=drop_student, group=group)

    def loss_fn(params, rows_in):
        obs, student, actions, noise, t, rows = rows_in
        model = eqx.combine(params, state.frozen)
        return train_loss(model, obs, student, actions, noise, t, lam=lam, anchor_frac=anchor_frac, teacher=teacher,
                          student_rows=rows)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    rows_in = (obs, student, actions, noise, t, rows)
    k = cfg.grad_accum_steps
    if k == 1:
        (loss, terms), grads = grad_fn(state.params, rows_in)
        return loss, terms, grads
    # Gradient accumulation: every term of the loss is a mean over rows, so the batch's loss and
    # gradients are the mean over k equal micro-batches (equal up to summation order). Everything
    # random was drawn above for the whole batch, so the rows see what they would in one step.
    # Micro-batch j takes rows j, j+k, ...: each device keeps its own rows in every micro-batch.
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), rows_in)

    def accumulate(total, mb):
        return jax.tree.map(jnp.add, total, grad_fn(state.params, mb)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, first))
    ((loss, terms), grads), _ = jax.lax.scan(accumulate, zeros, micro)
    return jax.tree.map(lambda x: x / k, (loss, terms, grads))


def step_keys(state: TrainState) -> tuple[PRNGKeyArray, PRNGKeyArray, PRNGKeyArray]:
    """The step's (augmentation, noise and time, student rows) keys: the run's key folded with the step."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_augment, k_noise, k_student = jax.random.split(key, 3)
    return k_augment, k_noise, k_student


def train_step(
    state: TrainState,
    batch: dict,
    p: Float[Array, ""],
    teacher: Pi05 | None,
    drop_student: bool = False,
    *,
    cfg: StepConfig,
) -> tuple[TrainState, dict[str, Float[Array, ""]]]:
    """`loss_and_grads`, then clip + AdamW on the trainable params and the EMA update (leaf by leaf)."""
    loss, terms, grads = loss_and_grads(state, batch, p, teacher, drop_student, cfg)
    params, opt_state, ema, grad_norm = apply_optimizer(cfg.lr, cfg.optimizer, grads, state.opt_state, state.params, state.ema,
                                                        cfg.ema_decay)
    new = TrainState(step=state.step + 1, params=params, frozen=state.frozen, opt_state=opt_state, ema=ema, rng=state.rng)
    metrics = dict(loss=loss, **terms, p=jnp.asarray(p, jnp.float32), grad_norm=grad_norm,
                   lr=jnp.asarray(lr_schedule(cfg.lr)(state.step), jnp.float32))
    return new, metrics


def _sharded_step(state, batch, p, teacher, drop_student, cfg, mesh, min_bytes):
    """`train_step` with its layout stated at the boundary: the state (in and out) and the teacher by
    the FSDP rule, the batch over ("data", "fsdp"), the metrics replicated."""
    fsdp = lambda tree: jax.lax.with_sharding_constraint(tree, fsdp_shardings(tree, mesh, min_bytes))  # noqa: E731
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding(mesh))
    new, metrics = train_step(fsdp(state), batch, p, fsdp(teacher), drop_student, cfg=cfg)
    return fsdp(new), jax.lax.with_sharding_constraint(metrics, replicated(mesh))


# One jitted step per set of XLA options (they are fixed when a function is jitted); the rest of
# what the program depends on is static, so jax.jit's own cache shares compilations between equal
# calls: same StepConfig, drop_student, mesh, min_bytes and argument shapes and shardings.
_STATIC = ("drop_student", "cfg", "mesh", "min_bytes")
_step = jax.jit(_sharded_step, static_argnames=_STATIC, donate_argnums=0)
_fast_step = jax.jit(_sharded_step, static_argnames=_STATIC, donate_argnums=0, compiler_options=FAST_COMPILE)


def _ema_leaf_on_host(ema: Float[Array, "..."], params: Float[Array, "..."], decay: float) -> Float[Array, "..."]:
    """One leaf of an EMA in pinned host memory: copied to the device, updated, written back."""
    on_device = jax.device_put(ema, jax.memory.Space.Device)
    return jax.device_put(ema_update(on_device, params, decay), jax.memory.Space.Host)


# With the step's XLA options (equal options give the in-step update's bits); the host buffer donated.
_ema_leaf = jax.jit(_ema_leaf_on_host, static_argnames="decay", donate_argnums=0)
_fast_ema_leaf = jax.jit(_ema_leaf_on_host, static_argnames="decay", donate_argnums=0, compiler_options=FAST_COMPILE)


def ema_update_on_host(ema: PyTree, params: PyTree, decay: float, fast_compile: bool = False) -> PyTree:
    """`state.ema_update` for an EMA in pinned host memory (`TrainConfig.ema_memory="host"`), one
    program per leaf, so the device holds one EMA leaf at a time besides the state."""
    update = _fast_ema_leaf if fast_compile else _ema_leaf
    return jax.tree.map(lambda e, p: update(e, p, decay=decay), ema, params)


def jit_train_step(
    state: TrainState,
    batch: dict,
    p: Float[ArrayLike, ""],
    teacher: Pi05 | None,
    drop_student: bool = False,
    *,
    cfg: StepConfig,
    mesh: Mesh,
    min_bytes: int,
) -> tuple[TrainState, dict[str, Float[Array, ""]]]:
    """`train_step` compiled for `mesh`: the state (in and out) and the teacher laid out by the FSDP
    rule (`fsdp_shardings` at `min_bytes`), the batch over ("data", "fsdp"), the metrics replicated;
    the state donated; XLA's `FAST_COMPILE` options when `cfg.fast_compile`. With `cfg.ema_on_host`
    the EMA stays out of the step (which runs as with `ema_decay=None`) and is updated after it from
    the new params, leaf by leaf in host memory (`ema_update_on_host`): the same arithmetic."""
    step = _fast_step if cfg.fast_compile else _step
    if not cfg.ema_on_host:
        return step(state, batch, p, teacher, drop_student=drop_student, cfg=cfg, mesh=mesh, min_bytes=min_bytes)
    no_ema = dataclasses.replace(cfg, ema_decay=None, ema_on_host=False)
    new, metrics = step(dataclasses.replace(state, ema=None), batch, p, teacher, drop_student=drop_student, cfg=no_ema,
                        mesh=mesh, min_bytes=min_bytes)
    return dataclasses.replace(new, ema=ema_update_on_host(state.ema, new.params, cfg.ema_decay, cfg.fast_compile)), metrics
