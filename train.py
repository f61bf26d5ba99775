"""Train a π0.5 variant of the research report.

    python train.py --variant NAME [--preset demo] [--num-train-steps N] [--output-dir DIR] [--resume]
                    [any field of the variant's TrainConfig: --distill.lam 0.5, --data.batch-size 64, ...]

Variants: pi05_libero (both cameras), wristonly_zero (B1), wristonly_physdrop (B2), curriculum_only
(B3), selfdistill_only (B4), curric_selfdistill (B5), lora_wristonly_zero_p05, lora_wristonly_zero_p1.
`--preset demo` trains the variant on the tiny model and the synthetic demo dataset (written to
~/.cache/eqx_pi05/demo_dataset on first use), a minute or two on a CPU.
`python train.py --variant NAME --help` lists every field of that variant with its value.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import jax
import tyro

from eqx_pi05.train.config import VARIANTS, TrainConfig, demo

DEMO_DATA = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "eqx_pi05" / "demo_dataset"


def parse(argv: list[str]) -> TrainConfig:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--variant", choices=sorted(VARIANTS), default=None)
    pre.add_argument("--preset", choices=["demo"], default=None)
    known, rest = pre.parse_known_args(argv)
    if known.variant is None:
        if {"-h", "--help"} & set(rest):
            print(__doc__)
            sys.exit(0)
        pre.error(f"--variant is required: one of {', '.join(VARIANTS)}")
    default = VARIANTS[known.variant]
    if known.preset == "demo":
        default = demo(default, DEMO_DATA)
    return tyro.cli(TrainConfig, default=default, args=rest, config=(tyro.conf.AvoidSubcommands,),
                    prog=f"train.py --variant {known.variant}" + (" --preset demo" if known.preset else ""))


def main(argv: list[str] | None = None) -> None:
    cfg = parse(sys.argv[1:] if argv is None else argv)
    from eqx_pi05.train.loop import ensure_demo_dataset, train  # noqa: PLC0415 - orbax, grain: after the CLI parsed

    # As openpi: compiled steps persist across runs (a rerun of the demo skips its ~half-minute compiles).
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path.home() / ".cache" / "jax"))
    if cfg.data.dataset == DEMO_DATA:
        ensure_demo_dataset(DEMO_DATA)
    try:
        records = train(cfg)
    except FloatingPointError as e:
        sys.exit(f"train.py: {e}")
    if records:
        first, last = records[0], records[-1]
        print(f"{cfg.name}: loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']}); "
              f"checkpoints in {cfg.run_dir / 'checkpoints'}")


if __name__ == "__main__":
    main()
