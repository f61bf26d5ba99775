"""Evaluate a checkpoint on LIBERO with openpi's protocol (SPEC.md §4), in the real simulator.

    python evaluate.py --n 500 --checkpoint DIR [--suite libero_spatial] [--output-dir DIR]
                       [--num-envs K] [--max-steps N] [--videos N] [--params ema|params]
                       [--eval-view deployed|real] [--policy-batch B]

The policy is the checkpoint's model with the transform chain and the eval-time camera removal of
its training variant (read from the checkpoint's saved config), its norm stats and tokenizer (stored
in the checkpoint), EMA params by default. A removal audit runs before the episodes and stops the
run if the policy reads a camera it must not see. Episodes are appended to OUTPUT/episodes.jsonl as
they finish; rerunning the same command resumes. The episodes do not depend on --num-envs.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Callable, Sequence
from typing import Literal

import tyro
from tqdm.contrib.logging import logging_redirect_tqdm

from eqx_pi05 import lock
from eqx_pi05.eval.run import EvalConfig, PolicyInfo, evaluate, plan
from eqx_pi05.logs import setup_logging


@dataclasses.dataclass(frozen=True)
class Args:
    # Checkpoint directory written by train.py (model params, EMA params, training config).
    checkpoint: pathlib.Path
    # Episodes in all, spread evenly over the suite's tasks (500 -> 10 tasks x 50 trials); below the
    # number of tasks, only the first n tasks are evaluated (one episode each).
    n: int = 500
    # LIBERO task suite.
    suite: Literal["libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"] = "libero_spatial"
    # Default: outputs/eval/<run name>[_step<N>]_<suite>.
    output_dir: pathlib.Path | None = None
    # Simulator worker processes batched into one policy call (1: everything in this process).
    num_envs: int = 1
    # Policy steps per episode; default the suite's (spatial 220, object 280, goal 300, 10: 520, 90: 400).
    max_steps: int | None = None
    # Episodes recorded as MP4 (agentview | wrist, a removed camera greyed).
    videos: int = 4
    # Which weights of the checkpoint: the EMA (default, as openpi evaluates) or the raw params.
    params: Literal["ema", "params"] = "ema"
    # Env seed (the reference's 7); also part of the output directory's identity for resuming.
    seed: int = 7
    # Task indices of the suite, comma-separated ("0" or "0,3,7"); default all. --n is spread over them.
    tasks: str | None = None
    # What a view_dropout variant (wristonly_zero, the LoRA zero variants) is given for the camera it was
    # trained to do without: "deployed" = zeros with mask True, as a robot without that camera; "real" =
    # the real frame (dropout is train-only: the research report's pipeline, to reproduce its B1 number).
    # view_remove variants are evaluated with their removal either way.
    eval_view: Literal["deployed", "real"] = "deployed"
    # Rows of every model call (unused rows padded): episodes depend on it, not on --num-envs. Raise it
    # with --num-envs on an accelerator to batch the workers' observations.
    policy_batch: int = 1
    # For a checkpoint written before train.py stored norm stats and tokenizer in it: read them from the
    # paths its config names (they must be the files it was trained with; recorded in the results).
    assets_from_config: bool = False
    # Show the libraries' INFO logs (absl, orbax, robosuite); by default one line per phase and a bar.
    verbose: bool = False

    def config(self) -> EvalConfig:
        ckpt = self.checkpoint.resolve()  # a run dir, or a step dir <run>/checkpoints/<N>
        name = f"{ckpt.parent.parent.name}_step{ckpt.name}" if ckpt.name.isdigit() else ckpt.name
        out = self.output_dir or pathlib.Path("outputs/eval") / f"{name}_{self.suite}"
        return EvalConfig(n=self.n, suite=self.suite, output_dir=out, num_envs=self.num_envs,
                          max_steps=self.max_steps, videos=self.videos, seed=self.seed, tasks=self.task_indices())

    def task_indices(self) -> tuple[int, ...] | None:
        if self.tasks is None:
            return None
        try:
            return tuple(int(i) for i in self.tasks.split(","))
        except ValueError:
            raise ValueError(f"--tasks {self.tasks!r}: expected comma-separated task indices, e.g. 0 or 0,3,7") from None


def main(
    args: Args,
    policy: Callable[[list[dict]], object] | None = None,
    info: PolicyInfo | None = None,
    tasks: Sequence | None = None,
    make_env: Callable | None = None,
) -> dict:
    """`policy`/`info` replace the checkpoint's policy (tests); both or neither."""
    if (policy is None) != (info is None):
        raise ValueError("evaluate.main: pass both `policy` and `info`, or neither (then the checkpoint's is built)")
    config = args.config()
    if policy is None:
        from eqx_pi05 import preflight  # noqa: PLC0415

        preflight.exit_if_missing(preflight.checkpoint_inputs(args.checkpoint, simulator=make_env is None,
                                                                assets_from_config=args.assets_from_config), "evaluate.py")
    # Everything that can be checked without the model is, before it loads (25-55 s): the episode
    # count against the suite's initial states, and that no other process writes the output dir.
    plan(config, tasks, make_env)
    lock.check(config.output_dir)
    if policy is None:
        from eqx_pi05.eval.policy import load_policy  # noqa: PLC0415 - JAX and the model only when needed

        logging.getLogger("eqx_pi05.eval").info("loading %s", args.checkpoint)
        policy, info = load_policy(args.checkpoint, params=args.params, batch_size=args.policy_batch,
                                   eval_view=args.eval_view, assets_from_config=args.assets_from_config)
    return evaluate(config, policy, info, tasks=tasks, make_env=make_env)


if __name__ == "__main__":
    import sys

    cli = tyro.cli(Args)
    setup_logging(cli.verbose)
    try:
        with logging_redirect_tqdm():
            main(cli)
    except (ValueError, OSError, lock.DirectoryInUse) as err:  # a bad argument, a directory in use: named, no traceback
        if cli.verbose:
            raise
        sys.exit(f"evaluate.py: {err}")
