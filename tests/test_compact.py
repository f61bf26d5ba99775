"""Physical removal (camera slot left out) is exactly the masked function: v_t, loss, gradients,
KV cache and sampled actions."""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batches import random_batch
from conftest import random_model, small_config

from eqx_pi05.cameras import compact, drop, removable
from eqx_pi05.loss import bc_per_sample
from eqx_pi05.model import Observation, Pi05, sample_actions

TOL = 1e-6
WRIST_ONLY = {"base_0_rgb": [False, False], "left_wrist_0_rgb": [True, True], "right_wrist_0_rgb": [False, False]}
BOTH = {"base_0_rgb": [True, True], "left_wrist_0_rgb": [True, True], "right_wrist_0_rgb": [False, False]}


@pytest.fixture(scope="module")
def small():
    config = small_config()
    return random_model(config, seed=4), config


def _noise_time(config, b=2):
    rng = np.random.default_rng(0)
    return (
        jnp.asarray(rng.normal(size=(b, config.action_horizon, config.action_dim)), jnp.float32),
        jnp.asarray([0.2, 0.9][:b], jnp.float32),
    )


def _loss(model, batch, noise, t):
    return jnp.mean(bc_per_sample(model, Observation.from_batch(batch), jnp.asarray(batch["actions"]), noise, t))


@pytest.mark.parametrize("masks,dropped", [(WRIST_ONLY, ("base_0_rgb", "right_wrist_0_rgb")), (BOTH, ("right_wrist_0_rgb",))])
def test_compacted_equals_masked_v_t_loss_gradients_and_actions(small, masks, dropped):
    model, config = small
    batch = random_batch(config, masks=masks)
    small_batch = compact(batch)
    assert removable(batch["image_mask"]) == dropped
    assert set(small_batch["image"]) == set(batch["image"]) - set(dropped)
    noise, t = _noise_time(config)
    v = eqx.filter_jit(Pi05.velocity)
    np.testing.assert_allclose(
        v(model, Observation.from_batch(small_batch), noise, t), v(model, Observation.from_batch(batch), noise, t), rtol=TOL, atol=TOL
    )
    grad = eqx.filter_jit(eqx.filter_value_and_grad(_loss))
    (l0, g0), (l1, g1) = grad(model, batch, noise, t), grad(model, small_batch, noise, t)
    np.testing.assert_allclose(l1, l0, rtol=TOL)
    chex.assert_trees_all_close(jax.tree.leaves(g1), jax.tree.leaves(g0), rtol=1e-5, atol=TOL)
    np.testing.assert_allclose(
        sample_actions(model, Observation.from_batch(small_batch), noise),
        sample_actions(model, Observation.from_batch(batch), noise),
        rtol=0,
        atol=TOL,
    )


def test_compacted_kv_cache_holds_exactly_the_valid_prefix_entries(small):
    model, config = small
    batch = random_batch(config, masks=WRIST_ONLY)
    prefill = eqx.filter_jit(Pi05.prefill)
    (k_full, v_full), mask_full = prefill(model, Observation.from_batch(batch))
    (k_small, v_small), mask_small = prefill(model, Observation.from_batch(compact(batch)))
    n = config.siglip.num_patches
    assert k_small.shape[2] == k_full.shape[2] - 2 * n  # two camera slots fewer
    for row in range(2):
        vf, vs = np.asarray(mask_full[row]), np.asarray(mask_small[row])
        assert vf.sum() == vs.sum()
        for full, small_ in ((k_full, k_small), (v_full, v_small)):
            # equal up to float reordering through the earlier layers' attention sums
            np.testing.assert_allclose(np.asarray(full)[:, row, vf], np.asarray(small_)[:, row, vs], rtol=1e-5, atol=2e-6)


def test_mixed_batch_is_left_masked():
    config = small_config()
    mixed = random_batch(config, masks={"base_0_rgb": [False, True], "left_wrist_0_rgb": [True, True], "right_wrist_0_rgb": [False, False]})
    assert removable(mixed["image_mask"]) == ("right_wrist_0_rgb",)
    assert set(compact(mixed)["image"]) == {"base_0_rgb", "left_wrist_0_rgb"}


def test_dropping_an_absent_camera_is_an_error():
    config = small_config()
    batch = drop(random_batch(config), ["right_wrist_0_rgb"])
    with pytest.raises(KeyError, match="right_wrist_0_rgb"):
        drop(batch, ["right_wrist_0_rgb"])
