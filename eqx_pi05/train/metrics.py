"""Metrics sinks: OUTPUT_DIR/metrics.jsonl (one object per logged step) and, optionally, wandb."""

from __future__ import annotations

import json
import math
import pathlib


class MetricsLog:
    """Appends `{"step": s, "loss": ..., ...}` lines; wandb is imported only when asked for, and its
    offline mode writes under OUTPUT_DIR/wandb with no network."""

    def __init__(self, path: pathlib.Path, *, fresh: bool, wandb_run: dict | None = None):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.write_text("")
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
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
