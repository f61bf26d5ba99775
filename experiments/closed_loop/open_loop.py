"""Open-loop check of a trained closed-loop policy on recorded episodes it was not trained on.

    python experiments/closed_loop/open_loop.py --checkpoint outputs/pi05_libero_closed_loop \
        --recording data/closed_loop [--stride 5] [--output experiments/closed_loop/open_loop.json]

Held-out episodes: the kept successful attempts of each task beyond the dataset's first
`episodes_per_task` (the recorder assembles the first N by attempt index, so later ones were never
trained on; record more than you train on to have some). For every `stride`-th frame the policy's
chunk is compared with the recorded next 5 actions (the evaluation executes 5 of 10): mean absolute
error per action axis (x, y, z in normalised command units, gripper in [-1, 1]) and how often the
gripper's sign agrees, next to the baseline that always predicts the training set's mean action.
If the policy is far better than the baseline on held-out frames but fails in the simulator, the
inputs agree end to end (orientation, normalisation, action scale, gripper sign) and the failure is
compounding error; if it is no better, something between recording and evaluation disagrees.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import tyro

from eqx_pi05.data.make_demo_dataset import LIBERO_SPATIAL_TASKS
from eqx_pi05.eval import record
from eqx_pi05.eval.policy import load_policy
from eqx_pi05.eval.rollout import policy_observation
from eqx_pi05.eval.sim import SimObservation

AXES = ("x", "y", "z", "gripper")
AXIS_DIMS = [0, 1, 2, 6]  # LIBERO's 7-dim action: xyz translation, rotation (never used by the recorder), gripper
EXECUTED = 5  # actions the evaluation executes of each chunk (replan_steps)


@dataclasses.dataclass(frozen=True)
class Args:
    checkpoint: pathlib.Path
    recording: pathlib.Path = pathlib.Path("data/closed_loop")
    stride: int = 5
    output: pathlib.Path | None = None


def split(recording: pathlib.Path) -> tuple[list[dict], list[dict]]:
    """(trained-on, held-out) kept successful attempts, by the dataset's meta/episode_success.jsonl."""
    trained = {(r["task"], r["attempt"]) for r in map(json.loads, (recording / "meta" / "episode_success.jsonl").open())}
    rows = [r for r in record.read_attempts(recording) if r["kept"] and r["success"]]
    return [r for r in rows if (r["task"], r["attempt"]) in trained], [r for r in rows if (r["task"], r["attempt"]) not in trained]


def main(args: Args) -> dict:
    trained, held_out = split(args.recording)
    if not held_out:
        raise SystemExit(f"{args.recording}: no held-out episode (every kept success is in the dataset): record more "
                         "episodes per task than the dataset holds, e.g. --resume --episodes-per-task N+5, then "
                         "reassemble with N")
    load = lambda r: record._load_episode(record._episode_file(args.recording, r["task"], r["attempt"]))  # noqa: E731
    mean = np.concatenate([load(r).actions for r in trained]).mean(0)
    policy, info = load_policy(args.checkpoint)
    errors, base, agree = [], [], []
    for r in held_out:
        ep = load(r)
        for t in range(0, len(ep) - EXECUTED + 1, args.stride):
            obs = SimObservation(agentview=ep.image[t], wrist=ep.wrist_image[t], state=ep.state[t])
            chunk = policy([policy_observation(obs, LIBERO_SPATIAL_TASKS[ep.task_index], seed=t)])[0][:EXECUTED]
            truth = ep.actions[t:t + EXECUTED]
            errors.append(np.abs(chunk[:, AXIS_DIMS] - truth[:, AXIS_DIMS]).mean(0))
            base.append(np.abs(mean[None, AXIS_DIMS] - truth[:, AXIS_DIMS]).mean(0))
            agree.append(np.mean(np.sign(chunk[:, 6]) == np.sign(truth[:, 6])))
    result = {
        "checkpoint": info.checkpoint,
        "held_out_episodes": [(r["task"], r["attempt"]) for r in held_out],
        "frames": len(errors),
        "policy_mae": dict(zip(AXES, np.mean(errors, 0).round(4).tolist(), strict=True)),
        "mean_action_mae": dict(zip(AXES, np.mean(base, 0).round(4).tolist(), strict=True)),
        "gripper_sign_agreement": round(float(np.mean(agree)), 4),
    }
    print(json.dumps(result, indent=2))
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
