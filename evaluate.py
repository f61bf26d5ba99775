"""Evaluate a checkpoint on LIBERO with openpi's protocol (SPEC.md §4), in the real simulator.

    python evaluate.py --n 500 --checkpoint DIR [--suite libero_spatial] [--tasks 0,3,7] [--output-dir DIR]
                       [--num-envs K] [--max-steps N] [--videos N] [--params ema|params]
                       [--eval-view deployed|real] [--policy-batch B]

The episodes' flags are the fields of eqx_pi05.eval.run.EvalConfig (validated there), the others say
which policy the checkpoint gives.

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
from typing import Annotated, Literal

import tyro
from tqdm.contrib.logging import logging_redirect_tqdm

from eqx_pi05 import lock
from eqx_pi05.eval.run import EvalConfig, PolicyInfo, evaluate, plan
from eqx_pi05.logs import setup_logging


@dataclasses.dataclass(frozen=True)
class Args:
    """Evaluate a train.py checkpoint on LIBERO in the real simulator (openpi's protocol); rerunning the
    same command resumes it."""

    # Checkpoint directory written by train.py (model params, EMA params, training config).
    checkpoint: pathlib.Path
    # The episodes: EvalConfig, each field a flag of its own name (--n, --tasks, ...; no prefix).
    eval: Annotated[EvalConfig, tyro.conf.OmitArgPrefixes] = EvalConfig()
    # Which weights of the checkpoint: the EMA (default, as openpi evaluates) or the raw params.
    params: Literal["ema", "params"] = "ema"
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
        """`eval`, its output directory by default outputs/eval/<run name>[_step<N>]_<suite>."""
        if self.eval.output_dir is not None:
            return self.eval
        ckpt = self.checkpoint.resolve()  # a run dir, or a step dir <run>/checkpoints/<N>
        name = f"{ckpt.parent.parent.name}_step{ckpt.name}" if ckpt.name.isdigit() else ckpt.name
        return dataclasses.replace(self.eval, output_dir=pathlib.Path("outputs/eval") / f"{name}_{self.eval.suite}")


def parse(argv: list[str]) -> Args:
    return tyro.cli(Args, args=argv, prog="evaluate.py")


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

    cli = parse(sys.argv[1:])
    setup_logging(cli.verbose)
    try:
        with logging_redirect_tqdm():
            main(cli)
    except (ValueError, OSError, lock.DirectoryInUse) as err:  # a bad argument, a directory in use: named, no traceback
        if cli.verbose:
            raise
        sys.exit(f"evaluate.py: {err}")
