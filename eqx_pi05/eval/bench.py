"""Simulator throughput on this machine: env creation, seconds per step, episodes/hour.

    python -m eqx_pi05.eval.bench [--episodes 4] [--num-envs 1 2] [--max-steps 220]

A stub policy that holds the arm still (never succeeds) keeps every episode at full length, so the
figures are the simulator's cost of a worst-case episode, without the model.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
import time

import numpy as np
import tyro

from eqx_pi05.eval import sim
from eqx_pi05.eval.rollout import SETTLE_ACTION
from eqx_pi05.eval.run import EvalConfig, PolicyInfo, evaluate


def hold_still(observations: list[dict]) -> np.ndarray:
    return np.broadcast_to(SETTLE_ACTION, (len(observations), 10, 7)).copy()


def time_env(suite: str, steps: int) -> dict:
    task = sim.suite_tasks(suite)[0]
    t0 = time.perf_counter()
    env = sim.LiberoEnv(task)
    created = time.perf_counter() - t0
    t0 = time.perf_counter()
    env.reset(0)
    first_reset = time.perf_counter() - t0
    t0 = time.perf_counter()
    env.step(SETTLE_ACTION)
    first_step = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        env.step(SETTLE_ACTION)
    per_step = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    env.reset(1)
    later_reset = time.perf_counter() - t0
    env.close()
    return {"env_creation_s": round(created, 2), "first_reset_s": round(first_reset, 2),
            "first_step_s": round(first_step, 2), "step_s": round(per_step, 4), "later_reset_s": round(later_reset, 2)}


@dataclasses.dataclass(frozen=True)
class Args:
    suite: str = "libero_spatial"
    episodes: int = 4
    num_envs: tuple[int, ...] = (1, 2)
    max_steps: int = 220
    steps: int = 50  # steps timed in the single-env measurement


def main(args: Args) -> dict:
    out = {"single_env": time_env(args.suite, args.steps)}
    print(json.dumps(out), flush=True)
    info = PolicyInfo("hold_still", "none", "none", "stub")
    for k in args.num_envs:
        with tempfile.TemporaryDirectory() as d:
            cfg = EvalConfig(n=args.episodes, suite=args.suite, output_dir=pathlib.Path(d), num_envs=k,
                             max_steps=args.max_steps, videos=0)
            t0 = time.perf_counter()
            evaluate(cfg, hold_still, info)
            wall = time.perf_counter() - t0
        out[f"num_envs={k}"] = {"episodes": args.episodes, "wall_s": round(wall, 1),
                                "episodes_per_hour": round(3600 * args.episodes / wall, 1)}
        print(json.dumps({f"num_envs={k}": out[f"num_envs={k}"]}), flush=True)
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
