"""Train a π0.5 variant of the research report.

    python train.py --variant NAME [--preset demo|closed_loop] [--num-train-steps N] [--output-dir DIR] [--resume]
                    [any field of the variant's TrainConfig: --distill.lam 0.5, --data.batch-size 64, ...]

`--variant NAME --preset P` is tyro's subcommand `NAME_P` (`python train.py NAME_P ...` is the same
command): one named config per variant and per variant on a preset, tyro.extras.overridable_config_cli
over them. `python train.py --help` lists them and the common flags; `python train.py --variant NAME
--help` every field of that variant with its value. Before anything is built, every input the run
reads is checked and all the missing ones are listed at once, each with the command that gets it.
"""

from __future__ import annotations

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

# --preset P: the variant's config on a smaller model and local data (eqx_pi05.variants), the subcommand NAME_P.
PRESETS = {
    "demo": ("the tiny model on the synthetic demo dataset: the whole path on a CPU in minutes",
             lambda cfg: demo(cfg, DEMO_DATA)),
    "closed_loop": ("a small from-scratch model on recorded LIBERO demos in data/closed_loop (experiments/closed_loop)",
                    closed_loop),
}
# name -> (the line `--help` shows, the config): the variants first, then each preset of each.
CONFIGS: dict[str, tuple[str, TrainConfig]] = {name: (SUMMARIES[name], cfg) for name, cfg in VARIANTS.items()} | {
    f"{name}_{preset}": (f"--variant {name} --preset {preset}", apply(cfg))
    for preset, (_, apply) in PRESETS.items() for name, cfg in VARIANTS.items()
}

# The flags most runs touch (every field is a flag: `--variant NAME --help` lists them all).
COMMON_FLAGS = (
    *((f"--preset {preset}", text) for preset, (text, _) in PRESETS.items()),
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
    ("--ema-memory host", "keep the EMA in host memory (12.5 GiB off one GPU at full size; the same bits)"),
    ("--wandb [--wandb-offline]", "also log to Weights & Biases"),
    ("--verbose", "show the libraries' INFO logs (absl, orbax, ...)"),
)


def _description() -> str:
    """The top of `python train.py --help`; tyro lists the configs below it."""
    width = max(len(flag) for flag, _ in COMMON_FLAGS) + 2
    return "\n".join([
        "python train.py --variant NAME [--preset demo|closed_loop] [flags], or the same as a subcommand: "
        "python train.py NAME[_PRESET] [flags]. `--variant NAME --help` lists every field of NAME with its value.",
        "", "common flags:", *(f"  {flag:<{width}}{text}" for flag, text in COMMON_FLAGS)])


def _subcommand_form(argv: list[str]) -> list[str]:
    """`--variant NAME [--preset P]` anywhere in `argv` (the README's and the scripts' form) as tyro's
    subcommand `NAME[_P]` in front of the other flags; without --variant, `argv` as it is."""
    picked, rest, words = {}, [], iter(argv)
    for word in words:
        flag, eq, value = word.partition("=")
        if flag in ("--variant", "--preset"):
            picked[flag] = value if eq else next(words, "")
        else:
            rest.append(word)
    if "--variant" not in picked:
        return argv
    return [picked["--variant"] + (f"_{picked['--preset']}" if "--preset" in picked else ""), *rest]


def parse(argv: list[str]) -> TrainConfig:
    return tyro.extras.overridable_config_cli(CONFIGS, prog="train.py", description=_description(),
                                              args=_subcommand_form(argv))


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
