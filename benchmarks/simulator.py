"""Simulator throughput on this machine: env creation, seconds per step, episodes/hour.

    python benchmarks/simulator.py [--episodes 4] [--num-envs 1 2] [--max-steps 220] [--render both wrist]

A stub policy that holds the arm still (never succeeds) keeps every episode at full length, so the
figures are the simulator's cost of a worst-case episode, without the model. `--render both` is a
both-camera policy (and what every evaluation rendered before only the read cameras were);
`wrist` a wrist-only policy (agentview removed), whose env renders the wrist camera only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import tyro

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from eqx_pi05.eval import sim
from eqx_pi05.eval.rollout import SETTLE_ACTION
from eqx_pi05.eval.run import EvalConfig, PolicyInfo, evaluate


def hold_still(observations: list[dict]) -> np.ndarray:
    return np.broadcast_to(SETTLE_ACTION, (len(observations), 10, 7)).copy()


RENDER = {"both": ("agentview", "wrist"), "wrist": ("wrist",)}


def time_env(suite: str, steps: int, cameras: tuple[str, ...] = RENDER["both"]) -> dict:
    task = sim.suite_tasks(suite)[0]
    t0 = time.perf_counter()
    env = sim.LiberoEnv(task, cameras=cameras)
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


def time_policy(batch_sizes: tuple[int, ...], calls: int = 5) -> dict:
    """Seconds per call of the model policy (transforms + jitted sampling + unnormalize) on the tiny
    random model (openpi's `dummy` Gemma, tiny SigLIP at 224 px), warm, per batch size."""
    import jax  # noqa: PLC0415
    import equinox as eqx  # noqa: PLC0415

    from eqx_pi05.config import pi05_tiny  # noqa: PLC0415
    from eqx_pi05.data.norm_stats import NormStats  # noqa: PLC0415
    from eqx_pi05.data.tokenizer import Tokenizer, train_sentencepiece  # noqa: PLC0415
    from eqx_pi05.data.transforms import Transforms  # noqa: PLC0415
    from fake_sim import FakeEnv, fake_tasks  # noqa: PLC0415 - tests/fake_sim.py
    from eqx_pi05.eval.policy import make_policy  # noqa: PLC0415
    from eqx_pi05.eval.rollout import policy_observation  # noqa: PLC0415
    from eqx_pi05.model import Pi05  # noqa: PLC0415
    from eqx_pi05.cameras import CameraProbs  # noqa: PLC0415

    config = pi05_tiny()
    model = eqx.filter_jit(lambda key: Pi05(config, key=key))(jax.random.key(0))
    with tempfile.TemporaryDirectory() as d:
        tokenizer = Tokenizer(train_sentencepiece([t.language for t in fake_tasks()] * 10, pathlib.Path(d) / "t.model"),
                              config.max_token_len)
    stats = {k: NormStats(np.zeros(n), np.ones(n), -np.ones(n), np.ones(n)) for k, n in (("state", 8), ("actions", 7))}
    transforms = Transforms(stats, tokenizer, False, config.action_horizon, 0, CameraProbs(), 0, CameraProbs(agentview=1.0))
    task = fake_tasks(1)[0]
    obs = policy_observation(FakeEnv(task).reset(0), task.language, 0)
    out = {}
    for b in batch_sizes:
        policy = make_policy(model, transforms, stats, batch_size=b)
        policy([obs] * b)  # compile
        t0 = time.perf_counter()
        for _ in range(calls):
            policy([obs] * b)
        out[f"tiny_policy_call_s_batch{b}"] = round((time.perf_counter() - t0) / calls, 4)
    return out


@dataclasses.dataclass(frozen=True)
class Args:
    # LIBERO task suite.
    suite: str = "libero_spatial"
    # Episodes per throughput run (spread over the suite's tasks).
    episodes: int = 4
    # Worker counts to compare (1: sequential, in this process).
    num_envs: tuple[int, ...] = (1, 2)
    # Policy steps per episode (the stub never succeeds, so every episode runs this long).
    max_steps: int = 220
    # Steps timed in the single-env measurement.
    steps: int = 50
    # Batch sizes for the tiny-model policy call timing; empty to skip.
    policy_batch_sizes: tuple[int, ...] = (1, 2)
    # Cameras rendered: "both" (a both-camera policy), "wrist" (a wrist-only policy renders only the wrist).
    render: tuple[str, ...] = ("both", "wrist")
    # Also write the figures as JSON here (benchmarks/results/eval_sim_cpu.json holds the last run).
    output: pathlib.Path | None = None


def main(args: Args) -> dict:
    out = {"policy": time_policy(args.policy_batch_sizes)} if args.policy_batch_sizes else {}
    print(json.dumps(out), flush=True)
    for render in args.render:
        out[f"single_env_{render}"] = time_env(args.suite, args.steps, RENDER[render])
        print(json.dumps({f"single_env_{render}": out[f"single_env_{render}"]}), flush=True)
    for render in args.render:
        hidden = {c: 1.0 for c in RENDER["both"] if c not in RENDER[render]}
        info = PolicyInfo("hold_still", "none", "none", "stub", view_remove_eval=hidden)
        for k in args.num_envs:
            with tempfile.TemporaryDirectory() as d:
                cfg = EvalConfig(n=args.episodes, suite=args.suite, output_dir=pathlib.Path(d), num_envs=k,
                                 max_steps=args.max_steps, videos=0)
                t0 = time.perf_counter()
                evaluate(cfg, hold_still, info)
                wall = time.perf_counter() - t0
            key = f"num_envs={k} render={render}"
            out[key] = {"episodes": args.episodes, "wall_s": round(wall, 1),
                        "episodes_per_hour": round(3600 * args.episodes / wall, 1), "load_avg_1min": os.getloadavg()[0]}
            print(json.dumps({key: out[key]}), flush=True)
    if args.output:
        args.output.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
