"""Train a π0.5 variant of the research report.

    python train.py --variant NAME [--preset demo|closed_loop] [--num-train-steps N] [--output-dir DIR] [--resume]
                    [any field of the variant's TrainConfig: --distill.lam 0.5, --data.batch-size 64, ...]

`python train.py --help` lists the variants and the common flags; `python train.py --variant NAME
--help` every field of that variant with its value. Before anything is built, every input the run
reads is checked and all the missing ones are listed at once, each with the command that gets it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import jax
import tyro
from tqdm.contrib.logging import logging_redirect_tqdm

from eqx_pi05 import preflight
from eqx_pi05.logs import setup_logging
from eqx_pi05.variants import SUMMARIES, VARIANTS, TrainConfig, closed_loop, demo

DEMO_DATA = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "eqx_pi05" / "demo_dataset"


# The flags most runs touch (every field is a flag: `--variant NAME --help` lists them all).
COMMON_FLAGS = (
    ("--preset demo", "the tiny model on the synthetic demo dataset: the whole path on a CPU in minutes"),
    ("--preset closed_loop", "a small from-scratch model on recorded LIBERO demos in data/closed_loop (experiments/closed_loop)"),
    ("--num-train-steps N", "steps to train (a --resume may extend them)"),
    ("--output-dir DIR", "where the run goes (default outputs/NAME; the demo: outputs/NAME_demo)"),
    ("--resume", "continue the run in --output-dir from its latest checkpoint"),
    ("--overwrite", "start over in an --output-dir that holds checkpoints"),
    ("--weights PATH|gs://...|None", "openpi params to start from (default checkpoints/pi05_base/params)"),
    ("--data.dataset DIR|HF_ID", "LeRobot dataset directory, or a Hugging Face dataset id (physical-intelligence/libero)"),
    ("--data.norm-stats FILE", "norm_stats.json (python -m eqx_pi05.data.norm_stats DATASET [--suites ...] --output FILE)"),
    ("--data.tokenizer FILE", "PaliGemma SentencePiece model"),
    ("--data.batch-size N", "global batch size"),
    ("--data.suites SUITE ...", "train on these LIBERO suites' episodes (libero_spatial ...; no value: all)"),
    ("--model.freeze-vision", "freeze the vision tower too (with LoRA: the report's frozen backbone)"),
    ("--fsdp-devices N", "shard params and optimizer state over N devices"),
    ("--wandb [--wandb-offline]", "also log to Weights & Biases"),
    ("--verbose", "show the libraries' INFO logs (absl, orbax, ...)"),
)


def overview() -> str:
    """`python train.py --help`: the variants, one line each, and the common flags."""
    width = max(map(len, VARIANTS)) + 2
    lines = ["usage: python train.py --variant NAME [--preset demo|closed_loop] [flags]", "", "variants:"]
    lines += [f"  {name:<{width}}{SUMMARIES[name]}" for name in VARIANTS]
    lines += ["", "common flags:"]
    width = max(len(flag) for flag, _ in COMMON_FLAGS) + 2
    lines += [f"  {flag:<{width}}{text}" for flag, text in COMMON_FLAGS]
    lines += ["", "python train.py --variant NAME --help lists every field of that variant with its value."]
    return "\n".join(lines)


def parse(argv: list[str]) -> TrainConfig:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--variant", choices=sorted(VARIANTS), default=None)
    pre.add_argument("--preset", choices=["demo", "closed_loop"], default=None)
    known, rest = pre.parse_known_args(argv)
    if known.variant is None:
        if {"-h", "--help"} & set(rest):
            print(overview())
            sys.exit(0)
        pre.error(f"--variant is required: one of {', '.join(VARIANTS)} (python train.py --help describes them)")
    default = VARIANTS[known.variant]
    if known.preset == "demo":
        default = demo(default, DEMO_DATA)
    elif known.preset == "closed_loop":
        default = closed_loop(default)
    return tyro.cli(TrainConfig, default=default, args=rest, config=(tyro.conf.AvoidSubcommands,),
                    prog=f"train.py --variant {known.variant}" + (f" --preset {known.preset}" if known.preset else ""))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging(verbose="--verbose" in argv)
    cfg = parse([a for a in argv if a != "--verbose"])
    from eqx_pi05.train.loop import ensure_demo_dataset, train  # noqa: PLC0415 - orbax, grain: after the CLI parsed

    if cfg.data.dataset == DEMO_DATA:
        ensure_demo_dataset(DEMO_DATA)
    cfg, missing = preflight.train_inputs(cfg)
    demo_hint = "" if cfg.data.dataset == DEMO_DATA else f"To try the whole path first: python train.py --variant {cfg.name} --preset demo"
    preflight.exit_if_missing(missing, "train.py", demo_hint)
    # As openpi: compiled steps persist across runs (a rerun of the demo skips its ~half-minute compiles).
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path.home() / ".cache" / "jax"))
    from eqx_pi05.checkpoints import CorruptCheckpoint  # noqa: PLC0415
    from eqx_pi05.lock import DirectoryInUse  # noqa: PLC0415

    try:
        with logging_redirect_tqdm():  # phase lines above the progress bar, not through it
            records = train(cfg)
    except (FloatingPointError, DirectoryInUse, CorruptCheckpoint, FileExistsError, FileNotFoundError, ValueError) as e:
        if "--verbose" in argv:  # the traceback too
            raise
        sys.exit(f"train.py: {e}")  # the messages name the file, field or value: no traceback by default
    if records:
        first, last = records[0], records[-1]
        print(f"{cfg.name}: loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']}); "
              f"checkpoints in {cfg.run_dir / 'checkpoints'}")
        print(f"next: MUJOCO_GL=egl python evaluate.py --checkpoint {cfg.run_dir} --n 2   (README: the path from here)")


if __name__ == "__main__":
    main()
