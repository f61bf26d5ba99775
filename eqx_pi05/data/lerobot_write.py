"""Write LIBERO-style episodes as a LeRobot dataset (v2.0, v2.1 or v3.0 layout) with pyarrow.

Used by `make_demo_dataset` (v2.0, the layout of `physical-intelligence/libero`) and by the tests
(v2.1 and v3.0). Images are PNG bytes inside the parquet as struct {bytes, path}, as LeRobot
writes `image` features through HF datasets.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
from collections.abc import Iterable

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
from jaxtyping import Float, UInt8

CHUNKS_SIZE = 1000
V2_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"


@dataclasses.dataclass(frozen=True)
class Episode:
    task_index: int
    image: UInt8[np.ndarray, "t h w 3"]  # agentview
    wrist_image: UInt8[np.ndarray, "t h w 3"]
    state: Float[np.ndarray, "t 8"]
    actions: Float[np.ndarray, "t 7"]

    def __len__(self) -> int:
        return len(self.state)


def encode_png(image: UInt8[np.ndarray, "h w 3"], compress_level: int = 1) -> bytes:
    out = io.BytesIO()
    PIL.Image.fromarray(image).save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()


def features(image_shape: tuple[int, int, int], state_dim: int = 8, action_dim: int = 7) -> dict:
    image = {"dtype": "image", "shape": list(image_shape), "names": ["height", "width", "channel"]}
    scalar = lambda dtype: {"dtype": dtype, "shape": [1], "names": None}  # noqa: E731
    return {
        "image": image,
        "wrist_image": dict(image),
        "state": {"dtype": "float32", "shape": [state_dim], "names": ["state"]},
        "actions": {"dtype": "float32", "shape": [action_dim], "names": ["actions"]},
        "timestamp": scalar("float32"),
        "frame_index": scalar("int64"),
        "episode_index": scalar("int64"),
        "index": scalar("int64"),
        "task_index": scalar("int64"),
    }


def episode_table(episode: Episode, episode_index: int, first_index: int, fps: float) -> pa.Table:
    n = len(episode)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = lambda frames: pa.array([{"bytes": encode_png(f), "path": None} for f in frames], image_type)  # noqa: E731
    vectors = lambda x: pa.array(list(np.asarray(x, np.float32)), pa.list_(pa.float32()))  # noqa: E731
    table = pa.table(
        {
            "image": images(episode.image),
            "wrist_image": images(episode.wrist_image),
            "state": vectors(episode.state),
            "actions": vectors(episode.actions),
            "timestamp": pa.array(np.arange(n, dtype=np.float32) / np.float32(fps)),
            "frame_index": pa.array(np.arange(n, dtype=np.int64)),
            "episode_index": pa.array(np.full(n, episode_index, np.int64)),
            "index": pa.array(np.arange(first_index, first_index + n, dtype=np.int64)),
            "task_index": pa.array(np.full(n, episode.task_index, np.int64)),
        }
    )
    # HF datasets keeps its feature types in the schema; LeRobot's loader reads images through them.
    hf = {"image": {"_type": "Image"}, "wrist_image": {"_type": "Image"}}
    for key, dim in (("state", episode.state.shape[1]), ("actions", episode.actions.shape[1])):
        hf[key] = {"feature": {"dtype": "float32", "_type": "Value"}, "length": int(dim), "_type": "Sequence"}
    for key, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"), ("index", "int64"), ("task_index", "int64")):
        hf[key] = {"dtype": dtype, "_type": "Value"}
    return table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": hf}})})


def write_dataset(
    root: str | pathlib.Path,
    episodes: Iterable[Episode],
    tasks: list[str],
    *,
    version: str = "v2.0",
    fps: float = 10.0,
    extra_info: dict | None = None,
    row_group_size: int = 100,
) -> pathlib.Path:
    """Write `episodes` (streamed: one in memory at a time for v2.x) under `root`; returns root."""
    if version not in ("v2.0", "v2.1", "v3.0"):
        raise ValueError(f"write_dataset: version must be v2.0, v2.1 or v3.0, got {version!r}")
    root = pathlib.Path(root)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    lengths, used_tasks, shapes, frames = [], [], None, 0
    v3_tables, stats_rows = [], []
    for episode_index, episode in enumerate(episodes):
        if not 0 <= episode.task_index < len(tasks):
            raise ValueError(f"episode {episode_index}: task_index {episode.task_index} outside 0..{len(tasks) - 1}")
        shapes = shapes or (episode.image.shape[1:], episode.state.shape[1], episode.actions.shape[1])
        table = episode_table(episode, episode_index, frames, fps)
        if version == "v3.0":
            v3_tables.append(table)
        else:
            path = root / V2_DATA_PATH.format(episode_chunk=episode_index // CHUNKS_SIZE, episode_index=episode_index)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path, row_group_size=row_group_size)
        if version == "v2.1":
            stats_rows.append({"episode_index": episode_index, "stats": {k: _stats(getattr(episode, k)) for k in ("state", "actions")}})
        lengths.append(len(episode))
        used_tasks.append(episode.task_index)
        frames += len(episode)
    if not lengths:
        raise ValueError("write_dataset: no episodes given")

    info = _info(version, len(lengths), frames, len(tasks), fps, shapes, extra_info)
    if version == "v3.0":
        _write_v3_meta(root, v3_tables, lengths, used_tasks, tasks, row_group_size)
    else:
        info["total_chunks"] = (len(lengths) - 1) // CHUNKS_SIZE + 1
        _write_jsonl(root / "meta" / "tasks.jsonl", [{"task_index": i, "task": t} for i, t in enumerate(tasks)])
        _write_jsonl(
            root / "meta" / "episodes.jsonl",
            [{"episode_index": e, "tasks": [tasks[t]], "length": n} for e, (t, n) in enumerate(zip(used_tasks, lengths))],
        )
        if version == "v2.1":
            _write_jsonl(root / "meta" / "episodes_stats.jsonl", stats_rows)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    return root


def _info(version: str, episodes: int, frames: int, tasks: int, fps: float, shapes: tuple, extra_info: dict | None) -> dict:
    """meta/info.json (v2.x adds total_chunks once the episodes are written)."""
    return {
        "codebase_version": version,
        "robot_type": "panda",
        "total_episodes": episodes,
        "total_frames": frames,
        "total_tasks": tasks,
        "total_videos": 0,
        "chunks_size": CHUNKS_SIZE,
        "fps": fps,
        "splits": {"train": f"0:{episodes}"},
        "data_path": V3_DATA_PATH if version == "v3.0" else V2_DATA_PATH,
        "video_path": V3_VIDEO_PATH if version == "v3.0" else None,
        "features": features(tuple(shapes[0]), shapes[1], shapes[2]),
        **(extra_info or {}),
    }


def _write_v3_meta(root, tables, lengths, used_tasks, tasks, row_group_size) -> None:
    """All episodes in data/chunk-000/file-000.parquet; episode and task tables as LeRobot 3.0 writes them."""
    path = root / V3_DATA_PATH.format(chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(tables), path, row_group_size=row_group_size)
    starts = np.cumsum([0] + lengths[:-1])
    episodes = pa.table(
        {
            "episode_index": pa.array(range(len(lengths)), pa.int64()),
            "tasks": pa.array([[tasks[t]] for t in used_tasks], pa.list_(pa.string())),
            "length": pa.array(lengths, pa.int64()),
            "data/chunk_index": pa.array([0] * len(lengths), pa.int64()),
            "data/file_index": pa.array([0] * len(lengths), pa.int64()),
            "dataset_from_index": pa.array(starts, pa.int64()),
            "dataset_to_index": pa.array(starts + np.asarray(lengths), pa.int64()),
            "meta/episodes/chunk_index": pa.array([0] * len(lengths), pa.int64()),
            "meta/episodes/file_index": pa.array([0] * len(lengths), pa.int64()),
        }
    )
    meta = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    meta.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(episodes, meta)
    # pandas' DataFrame(index=task).to_parquet layout: the index becomes a column named "task".
    pandas_meta = {
        "index_columns": ["task"],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
    }
    task_table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    pq.write_table(task_table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)}), root / "meta" / "tasks.parquet")


def _stats(x: np.ndarray) -> dict:
    x = np.asarray(x, np.float64)
    return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "count": [len(x)]}


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
