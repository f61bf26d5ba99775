"""A small LIBERO-Spatial-like LeRobot v2.0 dataset, plus its tokenizer and norm stats, offline.

    python -m eqx_pi05.data.make_demo_dataset OUT_DIR

Writes OUT_DIR/meta/*, OUT_DIR/data/chunk-000/episode_*.parquet (PNG bytes inside the parquet, as
`physical-intelligence/libero`), OUT_DIR/tokenizer.model (a tiny SentencePiece model with
PaliGemma's special ids, trained on the task strings) and OUT_DIR/norm_stats.json, so
`train.py --preset demo` needs nothing else. `meta/info.json["source"]` says how the frames were made.

Synthetic episodes (the default, and the only source without the simulator): a top-down table with
the ten LIBERO-Spatial landmarks; a red gripper blob carries the black bowl from a task-dependent
spot to the plate. Actions are the gripper's next displacement, so both cameras carry the signal a
policy needs (agentview sees everything, the wrist camera a zoomed window around the gripper).

The same layout recorded from scripted rollouts in the real LIBERO-Spatial simulator is written by
`python -m eqx_pi05.eval.record OUT_DIR` (next to the simulator: data does not import eval).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable
from typing import Annotated

import numpy as np
import tyro

from eqx_pi05.data import norm_stats
from eqx_pi05.data.episodes import LIBERO_SUITES
from eqx_pi05.data.lerobot import LeRobotSource
from eqx_pi05.data.lerobot_write import Episode, write_dataset
from eqx_pi05.data.tokenizer import train_sentencepiece

LIBERO_SPATIAL_TASKS = LIBERO_SUITES["libero_spatial"]
# Words the tokenizer should know beyond the task strings (other LIBERO suites, the pi05 state prompt).
EXTRA_TEXT = (
    "Task: State: Action: 0 1 2 3 4 5 6 7 8 9 ; , . put open close turn on off the drawer basket "
    "cream cheese ketchup alphabet soup tomato sauce butter milk orange juice chocolate pudding bbq "
    "wine bottle rack mug microwave caddy book frying pan moka pot left right front back of in top bottom"
)

IMAGE_SIZE = 256
# Landmark centres on the table, in [-1, 1]^2 (x right, y down in the agentview image).
PLATE = np.array([0.45, 0.35])
RAMEKIN = np.array([-0.1, 0.4])
COOKIE_BOX = np.array([-0.55, -0.1])
STOVE = np.array([0.5, -0.45])
CABINET = np.array([-0.45, -0.6])
# Where the bowl starts for each task, in task order.
BOWL_START = np.array(
    [
        (PLATE + RAMEKIN) / 2,
        RAMEKIN + [0.0, -0.3],
        [0.0, 0.0],
        COOKIE_BOX,
        CABINET + [0.0, 0.22],
        RAMEKIN,
        COOKIE_BOX + [0.3, 0.1],
        STOVE,
        PLATE + [-0.3, -0.2],
        CABINET,
    ]
)
MAX_STEP = 0.4  # world units per step for an action of magnitude 1 (no step of the paths is longer)


def _render(bowl: np.ndarray, plate: np.ndarray, eef: np.ndarray, closed: float, center: np.ndarray, half_width: float) -> np.ndarray:
    """Top-down RGB view of the table over [center ± half_width]; eef = (x, y, z)."""
    n = IMAGE_SIZE
    axis = (np.arange(n) + 0.5) / n * 2 - 1
    xs, ys = center[0] + half_width * axis, center[1] + half_width * axis
    image = np.empty((n, n, 3), np.uint8)
    image[...] = (150, 120, 90)  # table
    image[np.sin(ys * 40.0) > 0.6] = (140, 110, 82)  # wood grain, row by row

    def window(c, half):  # pixel ranges covering [c - half, c + half]: shapes are drawn only there
        lo = np.searchsorted(xs, c[0] - half[0]), np.searchsorted(ys, c[1] - half[1])
        hi = np.searchsorted(xs, c[0] + half[0]), np.searchsorted(ys, c[1] + half[1])
        return slice(lo[1], hi[1]), slice(lo[0], hi[0])

    def disc(c, r, colour):
        rows, cols = window(c, (r, r))
        inside = (xs[None, cols] - c[0]) ** 2 + (ys[rows, None] - c[1]) ** 2 < r * r
        image[rows, cols][inside] = colour

    def box(c, half, colour):
        image[window(c, half)] = colour

    box(CABINET, (0.25, 0.18), (110, 70, 40))
    box(STOVE, (0.18, 0.18), (60, 60, 65))
    box(COOKIE_BOX, (0.16, 0.1), (230, 140, 40))
    disc(RAMEKIN, 0.09, (235, 225, 200))
    disc(plate, 0.2, (245, 245, 245))
    disc(plate, 0.12, (225, 225, 230))
    disc(bowl, 0.12, (25, 25, 25))
    disc(bowl, 0.06, (60, 60, 60))
    disc(eef[:2], 0.05 + 0.04 * eef[2], (220, 30, 30))  # the gripper looks bigger when higher
    gap = 0.07 * (1 - closed) + 0.02
    box(eef[:2] + [-gap, 0.0], (0.015, 0.06), (200, 200, 210))
    box(eef[:2] + [gap, 0.0], (0.015, 0.06), (200, 200, 210))
    return image


def _synthetic_episode(task_index: int, rng: np.random.Generator, length: int) -> Episode:
    bowl0 = BOWL_START[task_index] + rng.normal(0, 0.03, 2)
    plate = PLATE + rng.normal(0, 0.03, 2)
    start = np.r_[rng.uniform(-0.6, 0.6, 2), 1.0]
    waypoints = np.array([start, [*bowl0, 1.0], [*bowl0, 0.0], [*bowl0, 1.0], [*plate, 1.0], [*plate, 0.2]])
    # Sample the piecewise-linear path at `length + 1` points evenly spaced in arc length.
    seg = np.linalg.norm(np.diff(waypoints, axis=0), axis=1)
    cum = np.r_[0.0, np.cumsum(seg)]
    s = np.linspace(0, cum[-1], length + 1)
    path = np.stack([np.interp(s, cum, waypoints[:, k]) for k in range(3)], axis=1)
    grasp, release = cum[2], cum[5] - 1e-9  # holding from reaching the bowl until the plate
    holding = (s >= grasp) & (s < release)
    delta = np.diff(path, axis=0)
    actions = np.zeros((length, 7), np.float32)
    actions[:, :3] = delta / MAX_STEP
    actions[:, 3:6] = rng.normal(0, 0.01, (length, 3))
    actions[:, 6] = np.where(holding[1:], 1.0, -1.0)  # LIBERO: -1 open, +1 close
    closed = holding[:length].astype(np.float64)
    state = np.zeros((length, 8), np.float32)
    state[:, :3] = path[:length]
    state[:, 3:6] = [np.pi, 0.0, 0.0] + rng.normal(0, 0.01, 3)
    state[:, 6] = 0.04 - 0.03 * closed
    state[:, 7] = -state[:, 6]
    images, wrist = [], []
    for t in range(length):
        bowl = path[t, :2] if closed[t] else (bowl0 if s[t] < grasp else plate)
        images.append(_render(bowl, plate, path[t], closed[t], center=np.zeros(2), half_width=1.0))
        wrist.append(_render(bowl, plate, path[t], closed[t], center=path[t, :2], half_width=0.35))
    return Episode(task_index, np.stack(images), np.stack(wrist), state, actions)


def make_demo_dataset(
    out_dir: str | pathlib.Path,
    *,
    episodes_per_task: int = 2,
    min_frames: int = 20,
    max_frames: int = 40,
    seed: int = 0,
    action_horizon: int = 10,
) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_frames, max_frames + 1, size=(len(LIBERO_SPATIAL_TASKS), episodes_per_task))
    episodes = (
        _synthetic_episode(task, rng, int(lengths[task, k]))
        for k in range(episodes_per_task)
        for task in range(len(LIBERO_SPATIAL_TASKS))
    )
    description = "synthetic: drawn top-down scenes, no LIBERO simulator"
    return write_demo_dataset(out_dir, episodes, description, fps=10.0, action_horizon=action_horizon)


def write_demo_dataset(
    out_dir: str | pathlib.Path,
    episodes: Iterable[Episode],
    description: str,
    *,
    fps: float,
    action_horizon: int = 10,
    summary: dict | None = None,
) -> pathlib.Path:
    """Write `episodes` of the LIBERO-Spatial tasks with the tokenizer and norm stats; `summary`
    (filled while `episodes` runs: "successes", "episodes") is appended to meta/info.json's source."""
    out_dir = pathlib.Path(out_dir)
    write_dataset(out_dir, episodes, list(LIBERO_SPATIAL_TASKS), fps=fps, extra_info={"source": description})
    if summary:  # known only once the rollouts ran
        info_path = out_dir / "meta" / "info.json"
        info = json.loads(info_path.read_text())
        info["source"] = f"{description}: {summary['successes']}/{summary['episodes']} successful"
        info_path.write_text(json.dumps(info, indent=4))
    train_sentencepiece([*LIBERO_SPATIAL_TASKS, EXTRA_TEXT], out_dir / "tokenizer.model")
    source = LeRobotSource(out_dir, action_horizon)
    norm_stats.save(norm_stats.compute_dataset_stats(source), out_dir / "norm_stats.json", tasks=source.task_names)
    return out_dir


def main(out_dir: Annotated[pathlib.Path, tyro.conf.Positional], episodes_per_task: int = 2, seed: int = 0) -> None:
    """Write the synthetic demo dataset, its tokenizer.model and norm_stats.json to OUT_DIR."""
    make_demo_dataset(out_dir, episodes_per_task=episodes_per_task, seed=seed)
    print(f"wrote {out_dir} (synthetic)")


if __name__ == "__main__":
    tyro.cli(main)
