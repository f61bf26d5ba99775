"""Loss curves of several runs from their metrics.jsonl, in one PNG."""

import json
import subprocess
import sys

import numpy as np
import pytest

from eqx_pi05 import plot


def write_run(directory, steps, distill=True, partial_tail=False, scale=1.0):
    directory.mkdir(parents=True)
    lines = []
    for s in steps:
        p = 0.5 * (1 - np.cos(np.pi * min(s / 75, 1.0)))
        record = {"step": s, "loss": scale * 2.0 / (1 + s / 10), "bc": scale * 1.5 / (1 + s / 10), "grad_norm": 1.0, "lr": 5e-5}
        if distill:
            record |= {"distill": 0.4 / (1 + s / 20), "anchor": 0.1 / (1 + s / 30), "p": p}
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n"
    if partial_tail:
        text += '{"step": 999, "loss": 0.'
    (directory / "metrics.jsonl").write_text(text)
    return directory


def test_read_metrics_skips_a_last_line_still_being_written(tmp_path):
    run = write_run(tmp_path / "run", range(0, 50, 10), partial_tail=True)
    records = plot.read_metrics(run)
    assert [r["step"] for r in records] == [0, 10, 20, 30, 40]
    assert plot.read_metrics(run / "metrics.jsonl") == records


def test_bad_lines_and_missing_files_are_errors_naming_where(tmp_path):
    run = write_run(tmp_path / "run", range(3))
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        plot.read_metrics(run)
    (run / "metrics.jsonl").write_text('{"loss": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: expected a JSON object with a 'step'"):
        plot.read_metrics(run)
    with pytest.raises(FileNotFoundError, match="expected a run directory holding metrics.jsonl"):
        plot.read_metrics(tmp_path / "nope")


def test_curve_is_in_step_order_skips_records_without_the_quantity_and_smooths():
    records = [{"step": 20, "bc": 3.0}, {"step": 0, "bc": 1.0}, {"step": 10, "loss": 5.0}, {"step": 30, "bc": None}, {"step": 10, "bc": 2.0}]
    steps, values = plot.curve(records, "bc")
    np.testing.assert_array_equal(steps, [0, 10, 20])
    np.testing.assert_array_equal(values, [1.0, 2.0, 3.0])
    _, smoothed = plot.curve(records, "bc", smooth=0.5)
    np.testing.assert_allclose(smoothed, [1.0, 1.5, 2.25])
    assert len(plot.curve(records, "distill")[0]) == 0
    with pytest.raises(ValueError, match=r"smooth: expected a factor in \[0, 1\)"):
        plot.curve(records, "bc", smooth=1.0)


def test_labels_are_run_names_unless_two_collide(tmp_path):
    a, b, c = write_run(tmp_path / "x" / "B1", [0]), write_run(tmp_path / "y" / "B1", [0]), write_run(tmp_path / "B4", [0])
    assert plot.labels([a, b, c / "metrics.jsonl"]) == [str(a), str(b), "B4"]


def _ink(image, rows, cols, panel):
    """Share of non-white pixels in one panel of the rows x cols grid."""
    h, w = image.shape[0] // rows, image.shape[1] // cols
    r, c = divmod(panel, cols)
    block = image[r * h : (r + 1) * h, c * w : (c + 1) * w, :3]
    return float(np.mean(block.min(axis=-1) < 0.9))


def test_cli_draws_every_run_into_one_png_with_a_panel_per_quantity(tmp_path):
    import matplotlib.image

    baseline = write_run(tmp_path / "B1_baseline", range(0, 100, 5), distill=False, scale=1.5)
    distilled = write_run(tmp_path / "B4_distill", range(0, 100, 5))
    out = tmp_path / "curves.png"
    done = subprocess.run([sys.executable, "-m", "eqx_pi05.plot", str(baseline), str(distilled), "--out", str(out), "--smooth", "0.5"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "B1_baseline: 20 records" in done.stdout and "B4_distill: 20 records" in done.stdout
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (2 * 396, 3 * 572)  # 2 x 3 panels at 110 dpi
    inks = [_ink(image, 2, 3, i) for i in range(6)]
    assert all(ink > 0.02 for ink in inks[:5]), inks  # every quantity's panel has axes and curves
    assert inks[5] < 0.001, inks  # the sixth cell is left empty


def test_each_panel_holds_exactly_the_runs_that_logged_its_quantity(tmp_path, capsys):
    runs = {"B1": plot.read_metrics(write_run(tmp_path / "B1", range(0, 30, 10), distill=False)),
            "B4": plot.read_metrics(write_run(tmp_path / "B4", range(0, 30, 10)))}
    panels = plot.plot_runs(runs, tmp_path / "c.png")
    assert panels == {"loss": ["B1", "B4"], "bc": ["B1", "B4"], "distill": ["B4"], "anchor": ["B4"], "p": ["B4"]}
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot.main(plot.Args(runs=(tmp_path / "B1",), out=tmp_path / "b1.png"))
    assert "not logged by any run: distill, anchor, p" in capsys.readouterr().out
