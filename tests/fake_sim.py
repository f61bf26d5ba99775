"""A fast stand-in for sim.LiberoEnv with the same interface, for tests and dry runs of the harness.

It keeps the property of LIBERO that matters for batching and resume: the scene of trial e depends
on the env's reset history since its seed (each reset draws a scene offset from the env's RNG), so
a harness that ran trials out of order or without replaying skipped resets would change episodes.
A point moves by the commanded translation; the episode is done when it reaches the goal at the
origin. Images are flat colours that encode the position, rotated as LIBERO's are not (no need).
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float

from eqx_pi05.eval.sim import RESOLUTION, SimObservation, Task

TRIALS = 50
GOAL_TOLERANCE = 0.05
STEP_SIZE = 0.05


def fake_tasks(n: int = 10) -> list[Task]:
    return [Task("fake", i, f"move the point home {i}", f"<fake task {i}>") for i in range(n)]


def fake_init_states(task: Task) -> Float[np.ndarray, "trials 3"]:
    """Start positions between 0.2 and 2.0 from the goal: near ones succeed, far ones time out."""
    rng = np.random.default_rng(1000 + task.index)
    direction = rng.normal(size=(TRIALS, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return direction * rng.uniform(0.2, 2.0, size=(TRIALS, 1))


class FakeEnv:
    def __init__(self, task: Task, seed: int = 7, resolution: int = RESOLUTION,
                 crash_at: tuple[tuple[int, int, int], ...] = ()):
        """`crash_at`: (task, trial, step) triples at which `step` raises, as a simulator glitch would."""
        self.task, self.resolution, self.crash_at = task, resolution, crash_at
        self._init_states = fake_init_states(task)
        self.num_trials = TRIALS
        self._rng = np.random.default_rng(seed)
        self.resets = 0
        self.trial, self.steps = -1, 0
        self.pos = np.zeros(3)
        self.gripper = 0.0

    def _obs(self) -> SimObservation:
        r = self.resolution
        level = (np.clip(np.abs(self.pos), 0, 1) * 255).astype(np.uint8)
        agentview = np.broadcast_to(level, (r, r, 3)).copy()
        wrist = np.broadcast_to(255 - level, (r, r, 3)).copy()
        wrist[: r // 2] = int(255 * abs(self.gripper))
        state = np.concatenate([self.pos, np.zeros(3), [self.gripper, -self.gripper]])
        return SimObservation(agentview=agentview, wrist=wrist, state=state)

    def reset(self, trial: int) -> SimObservation:
        if trial < self.resets:
            raise ValueError(f"fake task {self.task.index}: trial {trial} needs a fresh env "
                             f"(this one was reset {self.resets} times)")
        while self.resets <= trial:
            offset = self._rng.uniform(-0.05, 0.05, size=3)
            self.resets += 1
        self.pos = self._init_states[trial] + offset
        self.trial, self.steps, self.gripper = trial, 0, 0.0
        return self._obs()

    def step(self, action: Float[np.ndarray, "7"]) -> tuple[SimObservation, bool]:
        if (self.task.index, self.trial, self.steps) in self.crash_at:
            raise RuntimeError(f"fake simulator glitch at task {self.task.index} trial {self.trial} step {self.steps}")
        action = np.asarray(action, dtype=np.float64)
        self.pos = self.pos + STEP_SIZE * np.clip(action[:3], -1, 1)
        self.gripper = float(np.clip(action[6], -1, 1))
        self.steps += 1
        return self._obs(), bool(np.linalg.norm(self.pos) < GOAL_TOLERANCE)

    def close(self) -> None:
        pass


def homing_policy(observations: list[dict], horizon: int = 10, noise: float = 0.3) -> np.ndarray:
    """A deterministic policy for FakeEnv: steer the state's position to the origin, plus noise drawn
    from each observation's noise_seed (so it is the same whatever the batch)."""
    out = np.zeros((len(observations), horizon, 7))
    for i, obs in enumerate(observations):
        pos = np.asarray(obs["observation/state"][:3])
        rng = np.random.default_rng(obs["noise_seed"])
        for h in range(horizon):
            step = np.clip(-pos / STEP_SIZE, -1, 1) + noise * rng.normal(size=3)
            out[i, h, :3] = step
            pos = pos + STEP_SIZE * np.clip(step, -1, 1)
        out[i, :, 6] = -1.0
    return out
