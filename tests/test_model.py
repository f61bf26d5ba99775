"""Behaviour of the π0.5 model: camera removal invariants, KV cache, LoRA, dtypes, full size."""

import dataclasses

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batches import abstract_batch, random_batch
from conftest import random_model, small_config

from eqx_pi05.cameras import SLOTS
from eqx_pi05.config import GEMMA_DUMMY_LORA, pi05_full
from eqx_pi05.loss import bc_per_sample
from eqx_pi05.model import Observation, Pi05, count_params, sample_actions
from eqx_pi05.trainable import part_of, trainable_filter

velocity = eqx.filter_jit(Pi05.velocity)
loss_fn = eqx.filter_jit(bc_per_sample)


def sample_actions_uncached(model: Pi05, obs: Observation, noise: jax.Array, num_steps: int = 10) -> jax.Array:
    """The same integration as `sample_actions`, recomputing the whole sequence every step (the
    reference for the KV cache)."""
    dt = -1.0 / num_steps
    x, t = noise, jnp.float32(1.0)
    for _ in range(num_steps):
        x = x + dt * velocity(model, obs, x, jnp.broadcast_to(t, (noise.shape[0],)))
        t = t + dt
    return x


@pytest.fixture(scope="module")
def small():
    config = small_config()
    return random_model(config), config


def _rebuild(model, config):
    """The same weights under another static config (compute dtype, remat)."""
    from eqx_pi05.convert import openpi

    return openpi.from_openpi(openpi.to_openpi(model), config)


def _inputs(config, batch, seed=2):
    rng = np.random.default_rng(seed)
    shape = (batch, config.action_horizon, config.action_dim)
    return jnp.asarray(rng.normal(size=shape), jnp.float32), jnp.asarray(rng.uniform(0.05, 0.95, batch), jnp.float32)


def _with(batch, **kw):
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in batch.items()}
    for path, value in kw.items():
        group, cam = path.split("__")
        out[group][cam] = value
    return out


def test_removed_camera_pixels_do_not_change_v_t_or_actions(small):
    model, config = small
    masks = {"base_0_rgb": [False, True], "left_wrist_0_rgb": [True, True], "right_wrist_0_rgb": [False, False]}
    batch = random_batch(config, masks=masks)
    noise, t = _inputs(config, 2)
    other = np.random.default_rng(9).integers(0, 256, batch["image"]["base_0_rgb"].shape, dtype=np.uint8)
    other[1] = batch["image"]["base_0_rgb"][1]  # row 1 keeps its (valid) base camera
    changed = _with(batch, image__base_0_rgb=other)
    changed["image"]["right_wrist_0_rgb"] = 255 - batch["image"]["right_wrist_0_rgb"]
    a, b = Observation.from_batch(batch), Observation.from_batch(changed)
    chex.assert_trees_all_equal(velocity(model, a, noise, t), velocity(model, b, noise, t))
    chex.assert_trees_all_equal(sample_actions(model, a, noise), sample_actions(model, b, noise))


def test_zeroed_but_valid_camera_changes_the_output(small):
    model, config = small
    batch = random_batch(config)
    noise, t = _inputs(config, 2)
    zeroed = _with(batch, image__base_0_rgb=np.zeros_like(batch["image"]["base_0_rgb"]))
    v = velocity(model, Observation.from_batch(batch), noise, t)
    v_zero = velocity(model, Observation.from_batch(zeroed), noise, t)
    assert float(jnp.max(jnp.abs(v - v_zero))) > 1e-3
    a = sample_actions(model, Observation.from_batch(batch), noise)
    assert float(jnp.max(jnp.abs(a - sample_actions(model, Observation.from_batch(zeroed), noise)))) > 1e-3


def test_padding_prompt_tokens_do_not_change_the_output(small):
    model, config = small
    batch = random_batch(config)
    noise, t = _inputs(config, 2)
    junk = dict(batch)
    junk["tokenized_prompt"] = np.where(batch["tokenized_prompt_mask"], batch["tokenized_prompt"], 7).astype(np.int32)
    assert not np.array_equal(junk["tokenized_prompt"], batch["tokenized_prompt"])
    chex.assert_trees_all_equal(
        velocity(model, Observation.from_batch(batch), noise, t), velocity(model, Observation.from_batch(junk), noise, t)
    )


def test_kv_cached_sampling_equals_recomputing_the_full_sequence(small):
    model, config = small
    obs = Observation.from_batch(random_batch(config))
    noise, _ = _inputs(config, 2)
    np.testing.assert_allclose(
        sample_actions(model, obs, noise), sample_actions_uncached(model, obs, noise), rtol=0, atol=2e-6
    )


def test_kv_cached_sampling_matches_openpi_uncached_trajectory(golden, golden_outputs):
    _, cases, _ = golden
    for case in ("case_i", "case_ii", "case_iii"):
        ref = cases[f"{case}/sample_trajectory_joint_forward"][-1]
        np.testing.assert_allclose(golden_outputs[case]["sample_actions"], ref, rtol=0, atol=5e-6)


def test_prefix_kv_cache_matches_openpi(golden):
    from eqx_pi05.parity import observation

    model, cases, _ = golden
    kv, prefix_mask = eqx.filter_jit(Pi05.prefill)(model, observation(cases, "case_i"))
    from eqx_pi05.parity import rel_err

    valid = np.asarray(prefix_mask)  # entries at masked positions are artefacts in both implementations
    for ours, ref in zip(kv, (cases["case_i/prefix_kv_cache_k"], cases["case_i/prefix_kv_cache_v"])):
        ours, ref = np.asarray(ours)[:, valid], ref[:, valid]
        # RoPE angles reach ~800 rad here: float32 sin/cos of this XLA differ from openpi's by ~1 ulp
        assert rel_err(ours, ref) <= 1e-5
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_physically_removed_camera_equals_masked_camera_on_golden(golden):
    """Leaving a masked camera out of the observation is the same function (openpi's own check)."""
    from eqx_pi05.parity import observation

    model, cases, _ = golden
    obs = observation(cases, "case_ii")  # base removed in every row, right wrist padding
    compact = Observation(
        images={"left_wrist_0_rgb": obs.images["left_wrist_0_rgb"]},
        image_masks={"left_wrist_0_rgb": obs.image_masks["left_wrist_0_rgb"]},
        state=obs.state,
        tokenized_prompt=obs.tokenized_prompt,
        tokenized_prompt_mask=obs.tokenized_prompt_mask,
    )
    x_t, t = jnp.asarray(cases["case_ii/x_t"]), jnp.asarray(cases["inputs/time"])
    v = velocity(model, compact, x_t, t)
    np.testing.assert_allclose(v, cases["case_ii/v_t_physically_removed"], rtol=0, atol=2e-6)
    np.testing.assert_allclose(v, cases["case_ii/v_t"], rtol=0, atol=2e-6)


def test_loss_is_mean_squared_error_to_the_flow_target(small):
    model, config = small
    batch = random_batch(config)
    obs = Observation.from_batch(batch)
    noise, t = _inputs(config, 2)
    actions = jnp.asarray(batch["actions"])
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
    expected = jnp.mean((velocity(model, obs, x_t, t) - (noise - actions)) ** 2, axis=-1)
    np.testing.assert_allclose(loss_fn(model, obs, actions, noise, t), expected, rtol=1e-6, atol=1e-7)


def test_bfloat16_compute_stays_close_to_float32(small):
    model, config = small
    bf16 = _rebuild(model, dataclasses.replace(config, dtype="bfloat16"))
    obs = Observation.from_batch(random_batch(config))
    noise, t = _inputs(config, 2)
    v32, v16 = velocity(model, obs, noise, t), velocity(bf16, obs, noise, t)
    assert v16.dtype == jnp.float32  # action_out_proj promotes to the float32 params, as openpi
    rel = float(jnp.linalg.norm(v16 - v32) / jnp.linalg.norm(v32))
    assert 0 < rel < 0.05, rel


def test_remat_changes_nothing_but_memory(small):
    model, config = small
    remat = _rebuild(model, dataclasses.replace(config, remat=True))
    batch = random_batch(config)
    obs = Observation.from_batch(batch)
    noise, t = _inputs(config, 2)
    f = lambda m: jnp.mean(bc_per_sample(m, obs, jnp.asarray(batch["actions"]), noise, t))
    g0 = eqx.filter_jit(eqx.filter_grad(f))(model)
    g1 = eqx.filter_jit(eqx.filter_grad(f))(remat)
    chex.assert_trees_all_close(jax.tree.leaves(g0), jax.tree.leaves(g1), rtol=1e-5, atol=1e-6)


def test_lora_at_init_equals_the_base_model_and_filter_selects_only_adapters(small):
    from eqx_pi05.convert import openpi

    model, config = small
    lora_cfg = dataclasses.replace(config, paligemma=dataclasses.replace(config.paligemma, lora=GEMMA_DUMMY_LORA.lora), action_expert=dataclasses.replace(config.action_expert, lora=GEMMA_DUMMY_LORA.lora), freeze_vision=True)
    lora_model = openpi.from_openpi(openpi.to_openpi(model), lora_cfg, lora_seed=5)
    obs = Observation.from_batch(random_batch(config))
    noise, t = _inputs(config, 2)
    chex.assert_trees_all_equal(velocity(model, obs, noise, t), velocity(lora_model, obs, noise, t))

    trainable = eqx.filter(lora_model, trainable_filter(lora_model))  # frozen backbone: adapters and heads
    parts = [part_of(path) for path, _ in jax.tree_util.tree_leaves_with_path(trainable)]
    # 5 adapted weights per expert and layer, each with an A and a B factor; 4 head Dense layers
    assert parts.count("lora") == 2 * 5 * 2 and parts.count("heads") == 4 * 2 and len(parts) == 28
    assert 0 < count_params(trainable) < 0.2 * count_params(lora_model)
    trainable, frozen = eqx.partition(lora_model, jax.tree_util.tree_map_with_path(lambda p, _: part_of(p) == "lora", lora_model))
    # adapters change the function once trained: a gradient step on LoRA leaves only moves the output
    def f(tr):
        m = eqx.combine(tr, frozen)
        return jnp.mean(bc_per_sample(m, obs, jnp.asarray(random_batch(config)["actions"]), noise, t))

    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(f))
    before, grads = value_and_grad(trainable)
    assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads))) > 0
    after, _ = value_and_grad(jax.tree.map(lambda p, g: p - 1.0 * g, trainable, grads))
    assert float(after) < float(before)


def test_full_size_model_shapes_and_lowering_without_allocation():
    """3.35 B params through eval_shape, and the bf16 loss lowers ahead of time at full size."""
    from eqx_pi05.convert.openpi import abstract_model

    config = pi05_full()
    model = abstract_model(config)
    assert count_params(model) == 3_353_433_872
    b = 1
    batch = abstract_batch(config, b, SLOTS[:2])
    obs, act = jax.eval_shape(Observation.from_batch, batch), batch["actions"]
    t = jax.ShapeDtypeStruct((b,), jnp.float32)
    out = jax.eval_shape(Pi05.velocity, model, obs, act, t)
    assert out.shape == (b, config.action_horizon, 32) and out.dtype == jnp.float32
    params, static = eqx.partition(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    loss = lambda p, o, a, n, tt: bc_per_sample(eqx.combine(p, static), o, a, n, tt)
    lowered = jax.jit(loss).lower(params, obs, act, act, t)
    text = lowered.as_text()
    assert "bf16" in text and "f32[1,10]" in text.replace("tensor<1x10xf32>", "f32[1,10]")
