"""The train step's memory mechanisms compute today's step: the leaf-by-leaf optimizer equals optax's
tree-wide update, gradient accumulation equals the full-batch step up to summation order; the jitted
step compiles once for equal calls and donates the state."""

import dataclasses

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from batches import random_batch
from conftest import compile_counts, random_model, small_config

from eqx_pi05.augment import augment
from eqx_pi05.cameras import compact
from eqx_pi05.model import Observation
from eqx_pi05.variants import VARIANTS
from eqx_pi05.train.optimizer import apply_optimizer, make_optimizer
from eqx_pi05.train.sharding import fsdp_shardings, global_batch, make_mesh
from eqx_pi05.train.state import ema_update, init_state
from eqx_pi05.train.step import StepConfig, drops_student, jit_train_step, loss_and_grads, step_keys, train_step


def _state_and_batch(variant: str, b: int):
    cfg = small_config()
    train_cfg = VARIANTS[variant]
    state = init_state(random_model(cfg), make_optimizer(train_cfg.lr, train_cfg.optimizer), ema=True, seed=0)
    return train_cfg, state, compact(random_batch(cfg, b, seed=3))


def _step(step_cfg, state, batch, p, drop_student=False):
    return eqx.filter_jit(train_step)(state, batch, jnp.float32(p), None, drop_student, cfg=step_cfg)


@pytest.mark.parametrize("variant,p", [("curric_selfdistill", 0.5)])
def test_gradient_accumulation_equals_the_full_batch_step(variant, p):
    """K = 2 micro-batches of 2 rows: the same loss, terms, gradient norm and updated state (params,
    Adam moments, EMA) as one batch of 4, to float summation order; the curriculum's grouped mixed
    batch (rows drawn for the whole batch) included."""
    train_cfg, state, batch = _state_and_batch(variant, 4)
    step_cfg = dataclasses.replace(StepConfig.of(train_cfg), fast_compile=True)
    ref_state, ref = _step(step_cfg, state, batch, p)
    new_state, got = _step(dataclasses.replace(step_cfg, grad_accum_steps=2), state, batch, p)
    for k in ("loss", "bc", "distill", "anchor", "grad_norm"):
        np.testing.assert_allclose(got[k], ref[k], rtol=2e-6, atol=1e-8, err_msg=k)
    # The first step's update is ±lr per element whatever the gradient's size (Adam), so compare the
    # moments (the gradient itself) as well as the params.
    chex.assert_trees_all_close(new_state.opt_state, ref_state.opt_state, rtol=1e-5, atol=1e-8)
    chex.assert_trees_all_close((new_state.params, new_state.ema), (ref_state.params, ref_state.ema), rtol=1e-6, atol=1e-7)
    assert float(ref["loss"]) > 0


def test_gradient_accumulation_needs_equal_micro_batches():
    train_cfg, state, batch = _state_and_batch("pi05_libero", 3)
    with pytest.raises(TypeError, match="reshape"):
        _step(dataclasses.replace(StepConfig.of(train_cfg), grad_accum_steps=2, fast_compile=True), state, batch, 0.0)


@pytest.mark.parametrize("scale", [1e-3, 10.0])  # the global norm under and over the clip threshold
def test_leaf_by_leaf_optimizer_equals_optax_apply_updates_and_ema(scale):
    """`apply_optimizer` (clip, AdamW, apply, EMA one leaf after another) against today's formulation:
    `make_optimizer(...).update` on the whole tree, `optax.apply_updates`, `ema_update` — two steps."""
    train_cfg, state, _ = _state_and_batch("pi05_libero", 2)
    tx, lr, opt = make_optimizer(train_cfg.lr, train_cfg.optimizer), train_cfg.lr, train_cfg.optimizer
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype), state.params) for _ in range(2)]

    @jax.jit
    def reference(params, opt_state, ema, g):
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, ema_update(ema, params, 0.99), optax.tree.norm(g)

    ours = jax.jit(lambda p, o, e, g: apply_optimizer(lr, opt, g, o, p, e, 0.99))
    a = b = (state.params, state.opt_state, state.ema)
    for g in grads:
        a, b = ours(*a, g), reference(*b, g)
        np.testing.assert_allclose(a[3], b[3], rtol=1e-6)
        assert (float(a[3]) > opt.clip_gradient_norm) == (scale > 1)
        chex.assert_trees_all_close(a[:3], b[:3], rtol=1e-6, atol=1e-9)
        a, b = a[:3], b[:3]
    assert jax.tree.structure(a[1]) == jax.tree.structure(state.opt_state)


def test_a_curriculum_reaching_p_1_keeps_its_grouped_program_and_function():
    """curric_selfdistill at p = 1 stays on the p < 1 (grouped) program: every row takes the wrist-only
    forward, the same loss and gradients as the wrist-only-student program, so no second compile.
    Without a live both-camera forward (curriculum_only) p = 1 does switch to the cheaper program."""
    train_cfg, state, batch = _state_and_batch("curric_selfdistill", 2)
    step_cfg = dataclasses.replace(StepConfig.of(train_cfg), fast_compile=True)
    assert [drops_student(step_cfg, p) for p in (0.0, 0.5, 1.0)] == [False, False, False]
    assert drops_student(StepConfig.of(VARIANTS["curriculum_only"]), 1.0) and not drops_student(StepConfig.of(VARIANTS["pi05_libero"]), 1.0)
    run = eqx.filter_jit(loss_and_grads)
    grouped, dropped = (run(state, batch, jnp.float32(1.0), None, drop, step_cfg) for drop in (False, True))
    np.testing.assert_allclose(grouped[0], dropped[0], rtol=1e-6)
    chex.assert_trees_all_close(grouped[2], dropped[2], rtol=1e-5, atol=1e-7)


def test_equal_calls_share_one_compiled_step_which_donates_the_state():
    """`jit_train_step` compiles once (jax.jit's own cache) for the next step on its own output and for
    a second run's fresh state with an equal, not identical, StepConfig and mesh; each call donates
    the state it is given, and the second run repeats the first's losses."""
    train_cfg, state, batch = _state_and_batch("pi05_libero", 2)
    host = jax.device_get(state)  # each run places its own copy: the step deletes what it is given
    step_cfg = dataclasses.replace(StepConfig.of(train_cfg), fast_compile=True)
    losses = []
    with compile_counts() as compiled:
        for _ in range(2):
            mesh = make_mesh(1)
            state = jax.device_put(host, fsdp_shardings(host, mesh, 0))
            for _ in range(2):
                given = state
                state, metrics = jit_train_step(state, global_batch(batch, mesh), np.float32(0.0), None,
                                                cfg=dataclasses.replace(step_cfg), mesh=mesh, min_bytes=0)
                assert all(x.is_deleted() for x in jax.tree.leaves(given))
                losses.append(float(metrics["loss"]))
            assert int(state.step) == 2
    assert compiled["jit(_sharded_step)"] == 1
    assert losses[2:] == losses[:2] and losses[0] != losses[1]


def test_augment_black_frames_false_keeps_zeroed_frames_black_in_the_step():
    """--no-augment-black-frames reaches the step: its loss and gradients are those of the batch augmented
    with keep_black under the step's own augmentation key, where openpi's augmentation lifts some of
    the zeroed frames to grey."""
    train_cfg, state, batch = _state_and_batch("wristonly_zero", 16)
    batch["image"]["base_0_rgb"][:] = 0  # view_dropout's zeros
    step_cfg = dataclasses.replace(StepConfig.of(dataclasses.replace(train_cfg, augment_black_frames=False)), fast_compile=True)
    assert not step_cfg.augment_black_frames and StepConfig.of(train_cfg).augment_black_frames
    k_augment = step_keys(state)[0]
    faithful, kept = (augment(k_augment, Observation.from_batch(batch), keep_black=k) for k in (False, True))
    assert (np.asarray(faithful.images["base_0_rgb"]).max(axis=(1, 2, 3)) > -1.0).any()
    np.testing.assert_array_equal(kept.images["base_0_rgb"], -1.0)
    by_hand = {**batch, "image": {k: np.asarray(v) for k, v in kept.images.items()}}
    run = eqx.filter_jit(loss_and_grads)
    got = run(state, batch, jnp.float32(0.0), None, False, step_cfg)
    ref = run(state, by_hand, jnp.float32(0.0), None, False, dataclasses.replace(step_cfg, augment=False))
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    chex.assert_trees_all_close(got[2], ref[2], rtol=1e-5, atol=1e-7)
