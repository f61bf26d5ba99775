"""Batched simulator workers give the same episodes as the sequential loop (fake simulator)."""

import functools
import hashlib

import numpy as np
import pytest

from eqx_pi05.eval.batched import Settings, plan_chunks, run_chunks
from fake_sim import FakeEnv, fake_tasks, homing_policy

TASKS = fake_tasks(3)
SETTINGS = Settings(max_steps=25)  # the far starts time out: a mix of successes and failures


class FingerprintPolicy:
    """homing_policy that also remembers a hash of every observation it answered, by noise_seed."""

    def __init__(self):
        self.seen, self.batch_sizes = {}, []

    def __call__(self, observations):
        self.batch_sizes.append(len(observations))
        for obs in observations:
            data = b"".join(np.asarray(obs[k]).tobytes() for k in
                            ("observation/image", "observation/wrist_image", "observation/state"))
            self.seen[obs["noise_seed"]] = hashlib.sha1(data).hexdigest()
        return homing_policy(observations)


def _run(num_envs, todo, make_env=FakeEnv):
    policy, results = FingerprintPolicy(), []
    run_chunks(plan_chunks(todo, num_envs), make_env, policy, SETTINGS, num_envs, results.append)
    return sorted(results, key=lambda r: (r.task, r.trial)), policy


def _key(results):
    return [(r.task, r.trial, r.success, r.steps, r.error) for r in results]


def test_batched_workers_give_the_same_episodes_and_observations_as_sequential():
    todo = {t: list(range(5)) for t in TASKS}
    sequential, seq_policy = _run(1, todo)
    batched, bat_policy = _run(3, todo)
    assert len(sequential) == 15 and 0 < sum(r.success for r in sequential) < 15
    assert _key(batched) == _key(sequential)
    assert bat_policy.seen == seq_policy.seen  # every observation the policy saw, bit for bit
    assert max(bat_policy.batch_sizes) > 1 and max(seq_policy.batch_sizes) == 1


def test_chunks_that_start_late_replay_the_skipped_resets():
    todo = {TASKS[0]: list(range(6))}
    chunks = plan_chunks(todo, num_envs=2)
    assert [c.trials for c in chunks] == [(0, 1), (2, 3), (4,), (5,)]  # >= 2 chunks per worker
    whole, _ = _run(1, todo)
    split, _ = _run(2, todo)
    assert _key(split) == _key(whole)
    # Without the replay the scene differs: trial 4 on a fresh env whose history is empty.
    fresh = FakeEnv(TASKS[0])
    fresh.resets = 4
    replayed = FakeEnv(TASKS[0])
    assert not np.array_equal(fresh.reset(4)["state"], replayed.reset(4)["state"])


def test_a_resumed_subset_of_trials_matches_the_same_trials_of_a_full_run():
    full, _ = _run(1, {TASKS[1]: list(range(6))})
    part, _ = _run(2, {TASKS[1]: [1, 4, 5]})
    assert _key(part) == [k for k in _key(full) if k[1] in (1, 4, 5)]


def test_simulator_glitch_in_a_worker_is_a_failed_episode_not_a_crash():
    make_env = functools.partial(FakeEnv, crash_at=((TASKS[0].index, 1, 12),))
    results, _ = _run(2, {TASKS[0]: [0, 1, 2]}, make_env)
    assert [r.trial for r in results] == [0, 1, 2]
    assert results[1].error and not results[1].success and results[1].steps == 2


def _broken_env(task):
    raise OSError("no EGL display")


def test_worker_that_cannot_create_its_env_stops_the_run_with_the_workers_traceback():
    with pytest.raises(RuntimeError, match="no EGL display"):
        _run(2, {TASKS[0]: [0], TASKS[1]: [0]}, _broken_env)


def test_policy_returning_the_wrong_batch_size_stops_the_run():
    with pytest.raises(ValueError, match="expected actions"):
        run_chunks(plan_chunks({TASKS[0]: [0, 1]}, 2), FakeEnv, lambda obs: np.zeros((1, 10, 7)),
                   SETTINGS, 2, lambda r: None, gather_s=0.5)
