"""Loss curves of several training runs in one PNG, from their `metrics.jsonl`.

    python -m eqx_pi05.plot RUN_DIR [RUN_DIR ...] [--out loss_curves.png] [--smooth 0.9]

One panel per quantity (total loss, BC, distillation, anchor, and the curriculum's p(step)), one line
per run, labelled by its directory. A run that does not log a quantity (a baseline has no distill
term) is simply absent from that panel. The training loop appends one JSON object per logged step:
{"step", "loss", "bc", "distill", "anchor", "p", "grad_norm", "lr", ...}.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Annotated

import numpy as np
import tyro
from jaxtyping import Float

KEYS = ("loss", "bc", "distill", "anchor", "p")
TITLES = {"loss": "total loss", "bc": "BC (flow matching)", "distill": "distillation", "anchor": "anchor (teacher BC)", "p": "p(step): agentview removed"}
METRICS = "metrics.jsonl"


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """The records of a run's metrics.jsonl (`path`: the file or its run directory). A last line cut
    short by a run still writing is skipped; any other bad line is an error naming file and line."""
    path = pathlib.Path(path)
    file = path / METRICS if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (expected a run directory holding {METRICS})")
    text = file.read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                break  # being written
            raise ValueError(f"{file}:{number}: not JSON ({err.msg}): {line[:80]!r}") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{file}:{number}: expected a JSON object with a 'step', got {line[:80]!r}")
        records.append(record)
    return records


def curve(records: Sequence[Mapping], key: str, smooth: float = 0.0) -> tuple[Float[np.ndarray, " n"], Float[np.ndarray, " n"]]:
    """(steps, values) of the records carrying a number under `key`, in step order; `smooth` in [0, 1)
    is an exponential moving average factor (0: raw values)."""
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth: expected a factor in [0, 1), got {smooth}")
    points = sorted(
        (float(r["step"]), float(r[key]))
        for r in records
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
    )
    steps = np.array([s for s, _ in points], np.float64)
    values = np.array([v for _, v in points], np.float64)
    for i in range(1, len(values) if smooth else 0):
        values[i] = smooth * values[i - 1] + (1 - smooth) * values[i]
    return steps, values


def labels(paths: Sequence[pathlib.Path]) -> list[str]:
    """Each run's directory name, or its whole path where two names collide."""
    names = [p.name if p.is_dir() else p.parent.name for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def plot_runs(
    runs: Mapping[str, Sequence[Mapping]], out: str | pathlib.Path, keys: Sequence[str] = KEYS, smooth: float = 0.0
) -> dict[str, list[str]]:
    """Draw `keys` of every run (label -> records) into one PNG at `out`; returns, per quantity, the
    runs that logged it (an empty panel says "not logged")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(out)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    panels = {}
    for ax, key in zip(axes.flat, keys):
        drawn = []
        panels[key] = []
        for color, (label, records) in enumerate(runs.items()):  # a run keeps its colour in every panel
            steps, values = curve(records, key, smooth if key != "p" else 0.0)
            if len(steps):
                ax.plot(steps, values, label=label, linewidth=1.2, color=f"C{color % 10}")
                drawn.append(values)
                panels[key].append(label)
        ax.set_title(TITLES.get(key, key))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif key == "p":
            ax.set_ylim(-0.03, 1.03)
        elif all(np.nanmin(v) > 0 for v in drawn):
            ax.set_yscale("log")
        if drawn:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return panels


@dataclasses.dataclass(frozen=True)
class Args:
    runs: Annotated[tuple[pathlib.Path, ...], tyro.conf.Positional]
    """Run directories (each holding metrics.jsonl), or metrics.jsonl files."""
    out: pathlib.Path = pathlib.Path("loss_curves.png")
    smooth: float = 0.0
    """Exponential moving average factor for the losses (0: raw); p(step) is always drawn raw."""


def main(args: Args) -> pathlib.Path:
    if not args.runs:
        raise ValueError("plot: give at least one run directory")
    runs = {label: read_metrics(path) for label, path in zip(labels(args.runs), args.runs)}
    panels = plot_runs(runs, args.out, smooth=args.smooth)
    print(f"wrote {args.out} ({', '.join(f'{k}: {len(v)} records' for k, v in runs.items())})")
    missing = [k for k, drawn in panels.items() if not drawn]
    if missing:
        print(f"not logged by any run: {', '.join(missing)}")
    return args.out


if __name__ == "__main__":
    main(tyro.cli(Args))
