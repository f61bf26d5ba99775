"""The demo dataset recorded in the real LIBERO-Spatial simulator: scripted pick-and-place rollouts.

    python -m eqx_pi05.eval.record OUT_DIR [--episodes-per-task 2]

Same layout, tasks, tokenizer and norm stats as `eqx_pi05.data.make_demo_dataset` (the synthetic
source); it lives next to the simulator because data does not import eval. Needs the `libero` extra;
about a minute per episode on a 2-core CPU. `meta/info.json["source"]` reports the success count.
"""

from __future__ import annotations

import pathlib
from typing import Annotated

import numpy as np
import tyro

from eqx_pi05.data.lerobot_write import Episode
from eqx_pi05.data.make_demo_dataset import LIBERO_SPATIAL_TASKS, write_demo_dataset
from eqx_pi05.eval import sim


def record_libero_dataset(out_dir: str | pathlib.Path, *, episodes_per_task: int = 2, action_horizon: int = 10) -> pathlib.Path:
    summary: dict = {}
    episodes = _libero_episodes(episodes_per_task, summary)
    return write_demo_dataset(
        out_dir, episodes, "libero_spatial scripted rollouts", fps=20.0, action_horizon=action_horizon, summary=summary
    )


def _libero_episodes(episodes_per_task: int, summary: dict):
    """Scripted pick-and-place rollouts in LIBERO-Spatial through eqx_pi05.eval.sim (≈ 30 s each on CPU).

    Episode k of a task starts from the suite's fixed initial state k. The script reads the target
    bowl's and the plate's positions from the simulator, grasps the bowl by its rim (the fingers
    close along world y), carries it over the plate and lets go. Failed attempts are kept; `summary`
    receives the success count for meta/info.json.
    """
    summary.update(episodes=0, successes=0)
    for task in sim.suite_tasks("libero_spatial")[: len(LIBERO_SPATIAL_TASKS)]:
        env = sim.LiberoEnv(task)
        try:
            for trial in range(episodes_per_task):
                episode, success = _scripted_rollout(env, trial, LIBERO_SPATIAL_TASKS.index(task.language))
                summary["episodes"] += 1
                summary["successes"] += int(success)
                yield episode
        finally:
            env.close()


RIM_OFFSET = np.array([0.0, 0.05, 0.0])  # eef above the bowl's rim, not its hollow centre
SIM_MAX_STEPS = 220  # LIBERO-Spatial's episode limit in the reference evaluation


def _scripted_rollout(env, trial: int, task_index: int) -> tuple[Episode, bool]:
    # eqx_pi05.eval.sim.LiberoEnv exposes images and state only; object positions come from the
    # robosuite env underneath it (LIBERO's `obj_body_id` / `obj_of_interest`).
    inner = env._env
    body_pos = lambda name: np.array(inner.env.sim.data.body_xpos[inner.env.obj_body_id[name]])  # noqa: E731
    bowl_name, plate_name = inner.obj_of_interest[:2]
    obs = env.reset(trial)
    frames: list[tuple[dict, np.ndarray]] = []
    done = False

    def act(target: np.ndarray | None, grip: float, steps: int, tol: float = 0.008) -> None:
        nonlocal obs, done
        for _ in range(steps):
            if done or len(frames) >= SIM_MAX_STEPS:
                return
            action = np.zeros(7)
            action[6] = grip
            if target is not None:
                error = target - obs["state"][:3]
                if np.linalg.norm(error) < tol:
                    return
                action[:3] = np.clip(error * 20.0, -1.0, 1.0)
            frames.append((obs, action))
            obs, done = env.step(action)

    act(None, -1.0, 5)  # let the objects settle before reading where they are
    bowl = body_pos(bowl_name) + RIM_OFFSET
    act(bowl + [0, 0, 0.15], -1.0, 60)
    act(bowl + [0, 0, 0.03], -1.0, 40)
    act(None, 1.0, 12)
    act(obs["state"][:3] + [0, 0, 0.15], 1.0, 40)
    plate = body_pos(plate_name) + RIM_OFFSET
    act(plate + [0, 0, 0.15], 1.0, 60)
    act(plate + [0, 0, 0.08], 1.0, 30)
    act(None, -1.0, 15)
    episode = Episode(
        task_index,
        np.stack([o["agentview"] for o, _ in frames]),
        np.stack([o["wrist"] for o, _ in frames]),
        np.stack([o["state"] for o, _ in frames]).astype(np.float32),
        np.stack([a for _, a in frames]).astype(np.float32),
    )
    return episode, done


def main(out_dir: Annotated[pathlib.Path, tyro.conf.Positional], episodes_per_task: int = 2) -> None:
    """Record the LIBERO-Spatial demo dataset, its tokenizer.model and norm_stats.json to OUT_DIR."""
    record_libero_dataset(out_dir, episodes_per_task=episodes_per_task)
    print(f"wrote {out_dir} (libero)")


if __name__ == "__main__":
    tyro.cli(main)
