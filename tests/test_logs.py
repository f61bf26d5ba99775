"""Quiet by default: the libraries' INFO lines (absl/orbax, robosuite's import warnings) off, our
phase lines on; --verbose turns the libraries back on."""

import logging

import pytest

from eqx_pi05.logs import setup_logging

NAMES = ("absl", "orbax", "robosuite_logs", "eqx_pi05", "eqx_pi05.train.loop")


@pytest.fixture
def restore_levels():
    from absl import logging as absl_logging

    saved = {name: logging.getLogger(name).level for name in NAMES}
    verbosity = absl_logging.get_verbosity()
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)
    absl_logging.set_verbosity(verbosity)


def test_quiet_keeps_phase_lines_and_drops_library_info(restore_levels):
    setup_logging(verbose=False)
    assert logging.getLogger("eqx_pi05.train.loop").isEnabledFor(logging.INFO)
    assert not logging.getLogger("absl").isEnabledFor(logging.INFO)  # orbax logs through absl
    assert not logging.getLogger("orbax").isEnabledFor(logging.INFO)
    assert logging.getLogger("absl").isEnabledFor(logging.WARNING)  # warnings still show
    assert not logging.getLogger("robosuite_logs").isEnabledFor(logging.WARNING)  # "no private macro file"


def test_verbose_shows_the_libraries_info(restore_levels):
    setup_logging(verbose=True)
    for name in NAMES:
        assert logging.getLogger(name).isEnabledFor(logging.INFO), name
