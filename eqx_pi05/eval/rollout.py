"""One LIBERO episode, exactly as openpi's `examples/libero/main.py` runs it (SPEC-openpi.md §7.2).

10 settle steps with the gripper open-command `[0]*6 + [-1]`, then up to `max_steps` policy actions;
the policy is asked for a chunk whenever the plan is empty and the first `replan_steps` (5) actions
of the chunk are executed. Success = the env reports done. An exception from the simulator while
stepping ends the episode as a failure and is recorded with the episode; an exception from the
policy (a bug, not bad luck) propagates and stops the run, which can then be resumed.

The episode is a generator that yields the policy observation and receives the action chunk, so
the same code runs in-process (`run_episode`) and inside simulator worker processes (batched.py).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import time
from collections.abc import Callable, Generator
from typing import Protocol, runtime_checkable

import numpy as np
from jaxtyping import Float

from eqx_pi05.cameras import CAMERAS
from eqx_pi05.data.images import resize_with_pad
from eqx_pi05.eval.sim import SimObservation, Task

MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
SETTLE_STEPS = 10
REPLAN_STEPS = 5
SETTLE_ACTION = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
POLICY_RESOLUTION = 224

# observations (openpi client dicts) -> action chunks (n, horizon, 7)
Policy = Callable[[list[dict]], Float[np.ndarray, "n horizon 7"]]


@runtime_checkable
class Env(Protocol):
    """What the rollout needs from a simulator (sim.LiberoEnv, or tests/fake_sim.FakeEnv)."""

    num_trials: int  # fixed initial states of the task; reset(trial) takes 0 <= trial < num_trials

    def reset(self, trial: int) -> SimObservation: ...

    def step(self, action: Float[np.ndarray, "7"]) -> tuple[SimObservation, bool]: ...

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class EpisodeResult:
    task: int
    trial: int
    success: bool
    steps: int  # policy actions executed (settle steps not counted)
    seconds: float
    error: str | None = None


def noise_seed(task: int, trial: int, call: int) -> int:
    """A per-(episode, policy call) seed: a policy that draws its sampling noise from it gives the
    same actions whatever the batch composition, the worker count or a resume."""
    digest = hashlib.blake2b(f"{task}/{trial}/{call}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def policy_observation(obs: SimObservation, prompt: str, seed: int) -> dict:
    """The openpi client's request: images resized with padding to 224, the 8-dim state, the prompt.
    `noise_seed` is ours (openpi's server ignores extra keys)."""
    return {
        **{c.client_key: resize_with_pad(obs[name], POLICY_RESOLUTION, POLICY_RESOLUTION) for name, c in CAMERAS.items()},
        "observation/state": np.asarray(obs["state"]),
        "prompt": prompt,
        "noise_seed": seed,
    }


def check_chunk(chunk: np.ndarray, replan_steps: int, where: str) -> np.ndarray:
    chunk = np.asarray(chunk)
    if chunk.ndim != 2 or chunk.shape[0] < replan_steps or chunk.shape[1] != 7:
        raise ValueError(f"{where}: policy returned actions of shape {chunk.shape}, expected (horizon >= "
                         f"{replan_steps}, 7)")
    if not np.isfinite(chunk).all():
        raise ValueError(f"{where}: policy returned non-finite actions")
    return chunk


def episode(
    env: Env,
    task: Task,
    trial: int,
    max_steps: int,
    replan_steps: int = REPLAN_STEPS,
    on_frame: Callable[[SimObservation], None] | None = None,
) -> Generator[dict, np.ndarray, EpisodeResult]:
    """Yields policy observations, receives (horizon, 7) chunks, returns the EpisodeResult."""
    start = time.perf_counter()
    where = f"{task.suite} task {task.index} trial {trial}"
    obs = env.reset(trial)  # a failing reset is not bad luck: it propagates, as in the reference
    if on_frame:
        on_frame(obs)
    steps, success, error, calls = 0, False, None, 0
    plan: collections.deque = collections.deque()
    try:
        for _ in range(SETTLE_STEPS):  # done is not checked while settling, as in the reference
            obs, _ = env.step(SETTLE_ACTION)
            if on_frame:
                on_frame(obs)
    except Exception as e:  # noqa: BLE001 - the reference ends the episode on any simulator error
        error = f"{type(e).__name__}: {e}"
    while error is None and steps < max_steps:
        if not plan:
            chunk = yield policy_observation(obs, task.language, noise_seed(task.index, trial, calls))
            plan.extend(check_chunk(chunk, replan_steps, where)[:replan_steps])
            calls += 1
        try:
            obs, done = env.step(plan.popleft())
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
            break
        steps += 1
        if on_frame:
            on_frame(obs)
        if done:
            success = True
            break
    return EpisodeResult(task.index, trial, success, steps, round(time.perf_counter() - start, 3), error)


def drive(gen: Generator[dict, np.ndarray, EpisodeResult], act: Callable[[dict], np.ndarray]) -> EpisodeResult:
    """Run an `episode` generator to its end, answering each observation with `act(observation)`."""
    try:
        request = next(gen)
        while True:
            request = gen.send(act(request))
    except StopIteration as stop:
        return stop.value


def run_episode(env: Env, task: Task, trial: int, policy: Policy, max_steps: int, **kw) -> EpisodeResult:
    """One episode in this process, one single-observation policy call per replan."""
    return drive(episode(env, task, trial, max_steps, **kw), lambda obs: np.asarray(policy([obs]))[0])
