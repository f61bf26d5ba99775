"""Metrics sinks: OUTPUT_DIR/metrics.jsonl (one object per logged step) and, optionally, wandb.

A run resumed at step S drops the records of steps >= S first (logged by the killed run after its
last checkpoint; the resumed run logs them again), so the file holds one record per logged step
however many times the run was killed and resumed.
"""

from __future__ import annotations

import json
import math
import pathlib


class MetricsLog:
    """Appends `{"step": s, "loss": ..., ...}` lines; wandb is imported only when asked for, and its
    offline mode writes under OUTPUT_DIR/wandb with no network."""

    def __init__(self, path: pathlib.Path, *, start: int, wandb_run: dict | None = None):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read(self.path) if r["step"] < start] if start > 0 and self.path.exists() else []
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))
        tmp.replace(self.path)  # atomic: a kill here leaves the old file or the new one
        self.wandb = None
        if wandb_run is not None:
            import wandb  # noqa: PLC0415 - optional dependency

            self.wandb = wandb.init(**wandb_run)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and math.isfinite(v)}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def read(path: pathlib.Path) -> list[dict]:
    """The records of a metrics.jsonl; a last line cut short by a kill is skipped."""
    lines = [line for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not JSON: {line[:80]!r}") from None
    return records
