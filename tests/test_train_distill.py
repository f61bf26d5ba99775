"""Distillation loss against a hand computation (values and gradients), the in-loss camera removal,
and which forwards the step traces: none for the teacher when λ = anchor_frac = 0."""

import collections
import dataclasses
import functools

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batches import random_batch
from conftest import random_model, small_config

from eqx_pi05.cameras import compact, drop, mask
from eqx_pi05.loss import bc_per_sample, removed_rows, train_loss
from eqx_pi05.model import Observation, Pi05, sample_noise_and_time
from eqx_pi05.variants import VARIANTS
from eqx_pi05.train.optimizer import make_optimizer
from eqx_pi05.train.state import init_state
from eqx_pi05.train.step import FAST_COMPILE, StepConfig, loss_and_grads, step_keys

LAM, ANCHOR = 0.7, 0.2


@pytest.fixture(scope="module")
def setup():
    cfg = small_config()
    batch = compact(random_batch(cfg, 3))
    obs = Observation.from_batch(batch)
    # Student: agentview removed in rows 0 and 2, kept in row 1 (a mixed batch, as p < 1 gives).
    student = eqx.tree_at(lambda o: o.image_masks["base_0_rgb"], obs, jnp.array([False, True, False]))
    actions = jnp.asarray(batch["actions"])
    noise, t = sample_noise_and_time(jax.random.key(3), actions.shape)
    return random_model(cfg, seed=0), obs, student, actions, noise, t


def test_train_loss_and_gradients_match_a_hand_computation(setup):
    model, obs, student, actions, noise, t = setup

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def ours_and_hand(m):
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
        u_t = noise - actions
        v_s, v_both = m.velocity(student, x_t, t), m.velocity(obs, x_t, t)  # the target: a constant below

        def hand(m):  # BC + λ·distill with v_both fixed + anchor through the live both-camera forward
            vs, vb = m.velocity(student, x_t, t), m.velocity(obs, x_t, t)
            return jnp.mean((vs - u_t) ** 2) + LAM * jnp.mean((vs - v_both) ** 2) + ANCHOR * jnp.mean((vb - u_t) ** 2)

        ours = lambda m: train_loss(m, obs, student, actions, noise, t, lam=LAM, anchor_frac=ANCHOR)  # noqa: E731
        expected = dict(bc=jnp.mean((v_s - u_t) ** 2), model_loss=bc_per_sample(m, student, actions, noise, t).mean(),
                        distill=jnp.mean((v_s - v_both) ** 2), anchor=jnp.mean((v_both - u_t) ** 2))
        return eqx.filter_value_and_grad(ours, has_aux=True)(m), eqx.filter_grad(hand)(m), expected

    ((loss, terms), grads), hand_grads, expected = ours_and_hand(model)
    assert float(terms["bc"]) == pytest.approx(float(expected["bc"]), rel=1e-6)
    assert float(terms["bc"]) == pytest.approx(float(expected["model_loss"]), rel=1e-6)  # BC is the model's loss
    assert float(terms["distill"]) == pytest.approx(float(expected["distill"]), rel=1e-5)
    assert float(terms["anchor"]) == pytest.approx(float(expected["anchor"]), rel=1e-6)
    assert float(loss) == pytest.approx(float(expected["bc"] + LAM * expected["distill"] + ANCHOR * expected["anchor"]), rel=1e-6)
    assert 0 < float(terms["distill"])  # the student's removed rows make it differ from the teacher
    for a, b in zip(*(jax.tree.leaves(eqx.filter(g, eqx.is_array)) for g in (grads, hand_grads))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_a_separate_teacher_sets_the_target_and_the_live_model_the_anchor(setup):
    model, obs, student, actions, noise, t = setup
    other = random_model(small_config(), seed=1)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(model, other):
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
        v_s, v_other, v_live = (m.velocity(o, x_t, t) for m, o in ((model, student), (other, obs), (model, obs)))
        _, terms = train_loss(model, obs, student, actions, noise, t, lam=LAM, anchor_frac=ANCHOR, teacher=other)
        return terms, jnp.mean((v_s - v_other) ** 2), jnp.mean((v_live - (noise - actions)) ** 2)

    terms, distill, anchor = run(model, other)
    assert float(terms["distill"]) == pytest.approx(float(distill), rel=1e-5)
    assert float(terms["anchor"]) == pytest.approx(float(anchor), rel=1e-5)


def test_remove_camera_masks_rows_with_probability_p():
    n = 2000
    obs = Observation(images={"base_0_rgb": jnp.zeros((n, 1, 1, 3))}, image_masks={"base_0_rgb": jnp.arange(n) % 4 != 0},
                      state=jnp.zeros((n, 2)), tokenized_prompt=jnp.zeros((n, 1), jnp.int32), tokenized_prompt_mask=jnp.ones((n, 1), bool))
    key = jax.random.key(0)
    masked = lambda p: np.asarray(mask(obs, ["base_0_rgb"], removed_rows(key, jnp.float32(p), n)).image_masks["base_0_rgb"])  # noqa: E731
    before = np.asarray(obs.image_masks["base_0_rgb"])
    np.testing.assert_array_equal(masked(0.0), before)
    assert not masked(1.0).any()
    half = masked(0.5)
    assert not half[~before].any()  # an already masked row stays masked
    assert abs(half[before].mean() - 0.5) < 0.05
    assert "base_0_rgb" not in drop(obs, ["base_0_rgb"]).images


def _forwards(monkeypatch, step_cfg, state, batch, drop_student=False, teacher=None):
    """The observations' camera sets of every `Pi05.velocity` traced by one step (traced, not compiled)."""
    calls = collections.Counter()
    velocity = Pi05.velocity

    def counting(self, obs, x_t, t):
        calls[tuple(sorted(k for k in obs.images))] += 1
        return velocity(self, obs, x_t, t)

    monkeypatch.setattr(Pi05, "velocity", counting)
    jax.eval_shape(lambda s, b: loss_and_grads(s, b, jnp.float32(0.5), teacher, drop_student, step_cfg), state, batch)
    return calls


@pytest.fixture(scope="module")
def step_inputs():
    cfg = small_config()
    model = random_model(cfg)
    optimizer = make_optimizer(VARIANTS["pi05_libero"].lr, VARIANTS["pi05_libero"].optimizer)
    state = jax.eval_shape(lambda m: init_state(m, optimizer, ema=True, seed=0), model)
    return state, compact(random_batch(cfg, 2))


BOTH, WRIST = ("base_0_rgb", "left_wrist_0_rgb"), ("left_wrist_0_rgb",)


def test_without_lambda_and_anchor_the_teacher_forward_is_not_computed(monkeypatch, step_inputs):
    state, batch = step_inputs
    cfg = StepConfig.of(VARIANTS["curriculum_only"])  # lam = anchor_frac = 0
    assert _forwards(monkeypatch, cfg, state, batch) == {BOTH: 1}  # the student, agentview masked per row
    assert _forwards(monkeypatch, cfg, state, batch, drop_student=True) == {WRIST: 1}


def test_distillation_traces_one_student_and_one_teacher_forward(monkeypatch, step_inputs):
    state, batch = step_inputs
    cfg = StepConfig.of(VARIANTS["curric_selfdistill"])
    # p < 1 groups the rows: the compacted student beside the live forward, as at p = 1
    assert _forwards(monkeypatch, cfg, state, batch) == {WRIST: 1, BOTH: 1}
    assert _forwards(monkeypatch, dataclasses.replace(cfg, group_student=False), state, batch) == {BOTH: 2}
    assert _forwards(monkeypatch, cfg, state, batch, drop_student=True) == {WRIST: 1, BOTH: 1}
    ema = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher="ema"))  # EMA teacher + live anchor: three forwards
    assert _forwards(monkeypatch, ema, state, batch, drop_student=True) == {WRIST: 1, BOTH: 2}
    assert _forwards(monkeypatch, ema, state, batch) == {WRIST: 1, BOTH: 2}
    no_anchor = dataclasses.replace(ema, distill=dataclasses.replace(ema.distill, anchor_frac=0.0))  # no live forward: the student is masked per row
    assert _forwards(monkeypatch, no_anchor, state, batch, drop_student=True) == {WRIST: 1, BOTH: 1}
    assert _forwards(monkeypatch, no_anchor, state, batch) == {BOTH: 2}


def _student_rows(state, p, b):
    """The rows the step removes the student's camera from (drawn with the step's own student key)."""
    return np.asarray(removed_rows(step_keys(state)[2], jnp.float32(p), b))


@pytest.mark.parametrize("variant,p", [("curric_selfdistill", 0.5), ("curric_selfdistill", 1.0), ("curriculum_only", 0.5),
                                       ("curric_selfdistill_ema", 0.5)])
def test_compacted_distillation_step_equals_the_masked_reference(variant, p):
    """The step as it trains (padding slot left out; student wrist-only compacted at p = 1, grouped by
    camera set at p < 1 when the loss has the live both-camera forward) against the reference
    formulation (all three slots computed, the student's camera masked per row): same loss, terms
    and gradients."""
    cfg, b = small_config(), 4
    train_cfg = VARIANTS[variant.removesuffix("_ema")]
    if variant.endswith("_ema"):  # EMA teacher + anchor: the live forward is the anchor's
        train_cfg = dataclasses.replace(train_cfg, distill=dataclasses.replace(train_cfg.distill, teacher="ema"))
    step_cfg = dataclasses.replace(StepConfig.of(train_cfg), fast_compile=True)
    state = init_state(random_model(cfg), make_optimizer(train_cfg.lr, train_cfg.optimizer), ema=True, seed=0)
    state = eqx.tree_at(lambda s: s.ema, state, jax.tree.map(lambda x: x * 0.9, state.ema))  # EMA ≠ live params
    batch = random_batch(cfg, b)
    if p < 1:
        rows = _student_rows(state, p, b)
        assert 0 < rows.sum() < b  # a mixed batch
    run = eqx.filter_jit(loss_and_grads)
    ref_loss, ref_terms, ref_grads = run(state, batch, jnp.float32(p), None, False, dataclasses.replace(step_cfg, group_student=False))
    loss, terms, grads = run(state, compact(batch), jnp.float32(p), None, p >= 1, step_cfg)
    assert set(compact(batch)["image"]) == set(BOTH)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for k in ("bc", "distill", "anchor"):
        np.testing.assert_allclose(terms[k], ref_terms[k], rtol=1e-5, atol=1e-7)
    assert float(terms["bc"]) != float(terms["anchor"]) or train_cfg.distill.anchor_frac == 0  # the student did lose the camera
    chex.assert_trees_all_close(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), rtol=1e-5, atol=1e-6)


def test_grouping_the_student_needs_the_live_forward(setup):
    model, obs, student, actions, noise, t = setup
    with pytest.raises(ValueError, match="live both-camera forward"):
        train_loss(model, obs, drop(obs, ["base_0_rgb"]), actions, noise, t, lam=0.0, anchor_frac=0.0,
                     student_rows=jnp.array([True, False, True]))
