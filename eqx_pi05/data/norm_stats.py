"""Normalization statistics (openpi `norm_stats.json` layout) and quantile normalization.

    python -m eqx_pi05.data.norm_stats DATASET [--output FILE] [--action-horizon 10]
                                         [--suites libero_spatial ...] [--tasks "task string" ...]

`--suites` / `--tasks` select episodes exactly as the training config's `data.suites` / `data.tasks`
(eqx_pi05.data.episodes); the file records the tasks it was computed on (`"tasks"`, beside openpi's
`"norm_stats"`), and training refuses stats whose recorded tasks differ from its selection.

DATASET is a LeRobot dataset directory or a Hugging Face dataset id (physical-intelligence/libero,
read from the hub cache, downloaded into it when not there).

Statistics are over the same vectors openpi's `compute_norm_stats.py` sees: the state of every
frame, and every action of every frame's `action_horizon` chunk (so actions near an episode's end
count more, as there). Quantiles are exact (`np.quantile`), where openpi approximates them with
5000-bin running histograms: expect agreement to about 1e-3 of the range, not bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Annotated

import numpy as np
import tyro
from jaxtyping import Float

from eqx_pi05.data.episodes import Suite, selected_tasks

EPS = 1e-6  # openpi adds this to the quantile range (and to std)
KEYS = ("state", "actions")


@dataclasses.dataclass(frozen=True)
class NormStats:
    mean: Float[np.ndarray, " d"]
    std: Float[np.ndarray, " d"]
    q01: Float[np.ndarray, " d"]
    q99: Float[np.ndarray, " d"]


def compute(vectors: Float[np.ndarray, "n d"]) -> NormStats:
    vectors = np.asarray(vectors, np.float64)
    if vectors.ndim != 2 or len(vectors) < 2:
        raise ValueError(f"norm stats: expected at least 2 vectors (n, d), got shape {vectors.shape}")
    q01, q99 = np.quantile(vectors, [0.01, 0.99], axis=0)
    return NormStats(mean=vectors.mean(0), std=vectors.std(0), q01=q01, q99=q99)


def compute_dataset_stats(source) -> dict[str, NormStats]:
    """Stats of a `LeRobotSource`: state per frame, actions per frame's action chunk."""
    return {"state": compute(source.state), "actions": compute(source.actions[source.chunk_indices()].reshape(-1, source.actions.shape[-1]))}


def to_json(stats: dict[str, NormStats]) -> dict:
    """The openpi `norm_stats.json` layout: {"norm_stats": {key: {mean, std, q01, q99}}}."""
    return {"norm_stats": {key: {f: np.asarray(getattr(s, f)).tolist() for f in ("mean", "std", "q01", "q99")}
                           for key, s in stats.items()}}


def save(stats: dict[str, NormStats], path: str | pathlib.Path, tasks: list[str] | None = None) -> pathlib.Path:
    """Write openpi's layout; `tasks`: the task strings of the episodes the stats were computed on."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**to_json(stats), **({"tasks": sorted(tasks)} if tasks is not None else {})}, indent=2))
    return path


def recorded_tasks(path: str | pathlib.Path) -> list[str] | None:
    """The task strings a norm_stats.json says it was computed on; None when it does not say (openpi's files)."""
    return json.loads(pathlib.Path(path).read_text()).get("tasks")


def load(path: str | pathlib.Path) -> dict[str, NormStats]:
    """Read an openpi-layout norm_stats.json; `state` and `actions` need q01/q99 (quantile norm)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"norm stats: no file at {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"norm stats {path}: not valid JSON ({err})") from None
    return from_json(data, str(path))


def from_json(data: dict, where: str) -> dict[str, NormStats]:
    """Stats from the openpi layout (`to_json`); `where` names the source in errors."""
    if "norm_stats" not in data:
        raise ValueError(f"norm stats {where}: expected a top-level 'norm_stats' key, found {sorted(data)}")
    stats = {}
    for key in KEYS:
        entry = data["norm_stats"].get(key)
        if entry is None:
            raise ValueError(f"norm stats {where}: expected an entry {key!r}, found {sorted(data['norm_stats'])}")
        missing = [f for f in ("mean", "std", "q01", "q99") if entry.get(f) is None]
        if missing:
            raise ValueError(f"norm stats {where}: {key} lacks {missing} (quantile normalization needs q01 and q99)")
        fields = {f: np.asarray(entry[f], np.float64) for f in ("mean", "std", "q01", "q99")}
        shapes = {f: a.shape for f, a in fields.items()}
        if len(set(shapes.values())) != 1 or fields["mean"].ndim != 1:
            raise ValueError(f"norm stats {where}: {key} fields must be vectors of one length, got {shapes}")
        for f, a in fields.items():
            if not np.isfinite(a).all():
                raise ValueError(f"norm stats {where}: {key}.{f}[{int(np.flatnonzero(~np.isfinite(a))[0])}] is "
                                 f"{a[~np.isfinite(a)][0]}: expected finite numbers")
        stats[key] = NormStats(**fields)
    return stats


def quantile_normalize(x: Float[np.ndarray, "*b d"], stats: NormStats) -> Float[np.ndarray, "*b d"]:
    """(x - q01) / (q99 - q01 + 1e-6) * 2 - 1, not clipped (openpi `Normalize(use_quantiles=True)`)."""
    q01, q99 = stats.q01[..., : x.shape[-1]], stats.q99[..., : x.shape[-1]]
    return ((x - q01) / (q99 - q01 + EPS) * 2.0 - 1.0).astype(np.float32)


def quantile_unnormalize(y: Float[np.ndarray, "*b d"], stats: NormStats) -> Float[np.ndarray, "*b d"]:
    """Inverse of `quantile_normalize` on the first len(q01) dims; padded dims pass through."""
    dim = stats.q01.shape[-1]
    head = (y[..., :dim] + 1.0) / 2.0 * (stats.q99 - stats.q01 + EPS) + stats.q01
    return np.concatenate([head, y[..., dim:]], axis=-1).astype(np.float32)


def main(
    dataset: Annotated[pathlib.Path, tyro.conf.Positional],
    output: pathlib.Path | None = None,
    action_horizon: int = 10,
    suites: tuple[Suite, ...] = (),
    tasks: tuple[str, ...] = (),
) -> None:
    """Compute norm stats of a LeRobot dataset (the episodes of --suites / --tasks, default all); write
    DATASET/norm_stats.json unless --output says where."""
    from eqx_pi05.data import hub  # noqa: PLC0415
    from eqx_pi05.data.lerobot import LeRobotSource  # the reader is heavier than this module

    dataset = hub.resolve(dataset)
    source = LeRobotSource(dataset, action_horizon=action_horizon, tasks=selected_tasks(suites, tasks))
    path = save(compute_dataset_stats(source), output or dataset / "norm_stats.json", tasks=source.task_names)
    print(f"wrote {path}: {len(source)} frames, {source.num_episodes} episodes of {len(source.task_names)} tasks")


if __name__ == "__main__":
    tyro.cli(main)
