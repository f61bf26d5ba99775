"""The episode loop against a fake simulator with LIBERO's interface (fast, no MuJoCo)."""

import numpy as np
import pytest

from eqx_pi05.eval import rollout, sim
from fake_sim import FakeEnv, fake_tasks

TASK = fake_tasks(1)[0]


class RecordingEnv(FakeEnv):
    """FakeEnv that remembers every action it was stepped with and can report done at a given step."""

    def __init__(self, task, done_at=None, **kw):
        super().__init__(task, **kw)
        self.actions, self.done_at = [], done_at

    def step(self, action):
        self.actions.append(np.asarray(action).copy())
        obs, _ = super().step(action)
        return obs, self.done_at is not None and len(self.actions) == self.done_at


class CountingPolicy:
    """Chunk k has every action filled with k (and column 6 = -k), so executed actions say which chunk
    and which position they came from."""

    def __init__(self, horizon=10):
        self.calls, self.horizon, self.seen = 0, horizon, []

    def __call__(self, observations):
        self.seen.extend(observations)
        out = []
        for _ in observations:
            self.calls += 1
            chunk = np.full((self.horizon, 7), float(self.calls))
            chunk[:, 0] = np.arange(self.horizon)  # position in the chunk
            out.append(chunk)
        return np.stack(out)


def test_settles_ten_steps_then_executes_first_five_actions_of_each_chunk():
    env, policy = RecordingEnv(TASK), CountingPolicy()
    result = rollout.run_episode(env, TASK, 0, policy, max_steps=12)
    assert not result.success and result.steps == 12 and result.error is None
    settle, acted = env.actions[:10], np.array(env.actions[10:])
    assert all(np.array_equal(a, rollout.SETTLE_ACTION) for a in settle)
    assert len(acted) == 12 and policy.calls == 3  # 5 + 5 + 2 actions
    np.testing.assert_array_equal(acted[:, 1], [1] * 5 + [2] * 5 + [3] * 2)  # which chunk
    np.testing.assert_array_equal(acted[:, 0], [0, 1, 2, 3, 4] * 2 + [0, 1])  # first five of each


def test_done_ends_the_episode_as_success_with_the_actions_executed_so_far():
    env = RecordingEnv(TASK, done_at=10 + 7)  # 10 settle steps, then the 7th policy action reports done
    result = rollout.run_episode(env, TASK, 3, CountingPolicy(), max_steps=220)
    assert result.success and result.steps == 7 and result.trial == 3 and result.task == TASK.index
    assert len(env.actions) == 17


def test_done_during_settling_is_ignored_as_in_the_reference():
    env = RecordingEnv(TASK, done_at=4)
    result = rollout.run_episode(env, TASK, 0, CountingPolicy(), max_steps=6)
    assert not result.success and result.steps == 6


def test_simulator_exception_ends_episode_as_failure_with_the_error_recorded():
    env = FakeEnv(TASK, crash_at=((TASK.index, 0, 10 + 3),))
    result = rollout.run_episode(env, TASK, 0, CountingPolicy(), max_steps=50)
    assert not result.success and result.steps == 3
    assert "RuntimeError" in result.error and "glitch" in result.error


@pytest.mark.parametrize("bad", [np.zeros((3, 7)), np.zeros((10, 8)), np.full((10, 7), np.nan)])
def test_malformed_policy_output_stops_the_run_instead_of_failing_an_episode(bad):
    with pytest.raises(ValueError, match="trial 0"):
        rollout.run_episode(FakeEnv(TASK), TASK, 0, lambda obs: bad[None], max_steps=10)


def test_policy_sees_openpi_client_observation_224_images_state_prompt_and_a_per_call_seed():
    policy = CountingPolicy()
    rollout.run_episode(FakeEnv(TASK), TASK, 2, policy, max_steps=10)
    first, second = policy.seen
    assert first["observation/image"].shape == (224, 224, 3) and first["observation/image"].dtype == np.uint8
    assert first["observation/wrist_image"].shape == (224, 224, 3)
    assert first["observation/state"].shape == (8,)
    assert first["prompt"] == TASK.language
    assert first["noise_seed"] == rollout.noise_seed(TASK.index, 2, 0)
    assert second["noise_seed"] == rollout.noise_seed(TASK.index, 2, 1) != first["noise_seed"]


def test_policy_observation_is_a_plain_resize_from_256():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    obs = sim.SimObservation(agentview=image, wrist=image, state=np.zeros(8))
    out = rollout.policy_observation(obs, "p", 0)["observation/image"]
    from PIL import Image

    expected = np.asarray(Image.fromarray(image).resize((224, 224), resample=Image.BILINEAR))
    np.testing.assert_array_equal(out, expected)  # no padding: 256 -> 224 keeps the aspect ratio


def test_sim_observation_rotates_both_cameras_180_degrees_and_builds_the_8_dim_state():
    rng = np.random.default_rng(0)
    raw = {
        "agentview_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "robot0_eye_in_hand_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "robot0_eef_pos": np.array([0.1, 0.2, 0.3]),
        "robot0_eef_quat": np.array([0.0, 0.0, np.sin(np.pi / 4), np.cos(np.pi / 4)]),  # 90° about z
        "robot0_gripper_qpos": np.array([0.04, -0.04]),
    }
    obs = sim.sim_observation(raw)
    np.testing.assert_array_equal(obs["agentview"], np.rot90(raw["agentview_image"], 2))
    np.testing.assert_array_equal(obs["wrist"], raw["robot0_eye_in_hand_image"][::-1, ::-1])
    np.testing.assert_allclose(obs["state"], [0.1, 0.2, 0.3, 0, 0, np.pi / 2, 0.04, -0.04], atol=1e-12)


def test_quat2axisangle_follows_robosuite_identity_clipping_and_half_turns():
    np.testing.assert_array_equal(sim.quat2axisangle(np.array([0.0, 0.0, 0.0, 1.0])), np.zeros(3))
    np.testing.assert_array_equal(sim.quat2axisangle(np.array([0.0, 0.0, 0.0, 1.0000001])), np.zeros(3))
    np.testing.assert_allclose(sim.quat2axisangle(np.array([1.0, 0.0, 0.0, 0.0])), [np.pi, 0, 0])
    q = np.array([0.0, 0.0, 0.0, 1.0])
    sim.quat2axisangle(q)
    assert q[3] == 1.0  # the input is not modified
