"""What a command prints: one line per phase from eqx_pi05's loggers, the libraries' INFO only with --verbose.

orbax logs through absl, robosuite through its own `robosuite_logs` logger (its import-time "no
private macro file" warnings included); by default they show warnings (robosuite: errors) only, so
a run shows our phase lines ("compiling the training step ...") and tqdm bars, not pages of INFO.
"""

from __future__ import annotations

import logging
import os

# Loggers of libraries we call and the level they keep unless --verbose.
_QUIET = {"absl": logging.WARNING, "orbax": logging.WARNING, "grain": logging.WARNING, "robosuite_logs": logging.ERROR}


def setup_logging(verbose: bool = False) -> None:
    """Call once at the top of a command (before the libraries are imported, so their import-time lines obey too)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")  # XLA's C++ INFO/WARNING lines
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s")
    logging.getLogger("eqx_pi05").setLevel(logging.INFO)
    for name, level in _QUIET.items():
        logging.getLogger(name).setLevel(logging.INFO if verbose else level)
    try:
        from absl import logging as absl_logging  # noqa: PLC0415 - absl keeps its own verbosity
    except ImportError:
        return
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
