"""A random-access source over a LeRobot-format LIBERO dataset directory, read with pyarrow.

Layouts (SPEC.md §2):
- v2.0 / v2.1: one parquet per episode at `info["data_path"]` (`episode_chunk`, `episode_index`),
  `meta/tasks.jsonl`, `meta/episodes.jsonl` (v2.1 adds `meta/episodes_stats.jsonl`, unused here).
- v3.0: several episodes per `data/chunk-{c:03d}/file-{f:03d}.parquet`, `meta/tasks.parquet`,
  `meta/episodes/chunk-{c:03d}/file-{f:03d}.parquet`; video features live in mp4 files (PyAV).
Images stored in parquet are encoded bytes in a struct {bytes, path}, as HF datasets writes them.

At construction every data file's numeric columns are read and checked (columns present, vector
lengths as `meta/info.json` declares, finite values, known task indices, frames in order), so bad
input fails before training starts, with the file, episode and frame. Images are decoded per sample;
their errors name the same three.

`source[i]` is frame i in the openpi client's key names, the input of `transforms.make_transforms`:
{"observation/image", "observation/wrist_image": uint8 HWC, "observation/state": float32 (8,),
 "actions": float32 (action_horizon, 7), "prompt": str}.
"""

from __future__ import annotations

import collections
import json
import pathlib
import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from eqx_pi05.cameras import CAMERAS
from eqx_pi05.data import images as _images

SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
# openpi client key <- LeRobot feature (physical-intelligence/libero names).
IMAGE_FEATURES = {c.client_key: c.lerobot_feature for c in CAMERAS.values()}
VECTOR_FEATURES = {"observation/state": "state", "actions": "actions"}
INDEX_COLUMNS = ("episode_index", "frame_index", "task_index")
ROW_GROUP_CACHE_BYTES = 256 << 20  # per process: encoded images of recently read row groups


class LeRobotSource:
    """grain.sources.RandomAccessDataSource over the frames of a LeRobot dataset."""

    def __init__(self, root: str | pathlib.Path, action_horizon: int, tasks: tuple[str, ...] | None = None):
        """`tasks`: keep only the episodes of these task strings (each must be in the dataset); None: all."""
        self.root = pathlib.Path(root)
        self.action_horizon = action_horizon
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{self.root}: not a LeRobot dataset, expected {info_path}")
        try:
            self.info = json.loads(info_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{info_path}: not valid JSON ({err}); expected LeRobot's dataset description") from None
        if not isinstance(self.info, dict):
            raise ValueError(f"{info_path}: expected a JSON object, got {type(self.info).__name__}")
        self.version = self.info.get("codebase_version")
        if self.version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"{info_path}: codebase_version {self.version!r} is not supported; "
                f"this reader takes {', '.join(SUPPORTED_VERSIONS)}"
            )
        self.fps = float(self.info.get("fps", 10))
        self.features = self.info.get("features", {})
        for key, feature in {**IMAGE_FEATURES, **VECTOR_FEATURES}.items():
            if feature not in self.features:
                raise ValueError(f"{info_path}: feature {feature!r} (for {key}) missing; features are {sorted(self.features)}")
        for feature in IMAGE_FEATURES.values():
            if self.features[feature]["dtype"] not in ("image", "video"):
                raise ValueError(f"{info_path}: feature {feature!r} expected dtype image or video, got {self.features[feature]['dtype']!r}")

        if self.version == "v3.0":
            self.tasks, episodes = _tasks_v3(self.root), _episodes_v3(self.root)
            self.files = sorted({self._v3_path("data_path", e["data/chunk_index"], e["data/file_index"]) for e in episodes.values()})
        else:
            self.tasks, episodes = _tasks_v2(self.root), _episodes_v2(self.root)
            self.files = [self._v2_path("data_path", e) for e in sorted(episodes)]
        if not episodes:
            raise ValueError(f"{self.root}: empty dataset, the episode metadata lists no episodes")
        self._episodes = episodes
        for path in self.files:
            if not path.is_file():
                raise FileNotFoundError(f"{self.root}: data file {path} listed by the metadata is missing")
        self._read_columns()
        if tasks is not None:
            self._select(tasks)
        self._lock: threading.Lock | None = None  # the per-process cache is built on first read

    # ---- construction -------------------------------------------------------------------------

    def _v2_path(self, template_key: str, episode: int, **kw) -> pathlib.Path:
        chunk = episode // int(self.info.get("chunks_size", 1000))
        return self.root / self.info[template_key].format(episode_chunk=chunk, episode_index=episode, **kw)

    def _v3_path(self, template_key: str, chunk: int, file: int, **kw) -> pathlib.Path:
        return self.root / self.info[template_key].format(chunk_index=int(chunk), file_index=int(file), **kw)

    def _read_columns(self) -> None:
        columns = {name: [] for name in (*INDEX_COLUMNS, "timestamp", *VECTOR_FEATURES.values(), "file", "row")}
        files = tqdm(self.files, desc=f"reading {self.root.name}", unit="file", leave=False, disable=len(self.files) < 10)
        for file_id, path in enumerate(files):
            schema = _parquet(pq.read_schema, path)
            wanted = [*INDEX_COLUMNS, *VECTOR_FEATURES.values(), *self._parquet_image_features()]
            missing = [c for c in wanted if c not in schema.names]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; the file has {schema.names}")
            read = [*INDEX_COLUMNS, *VECTOR_FEATURES.values()] + (["timestamp"] if "timestamp" in schema.names else [])
            table = _parquet(pq.read_table, path, columns=read)
            n = table.num_rows
            index = {c: _scalars(table.column(c), f"{path}: column {c}") for c in INDEX_COLUMNS}
            where = lambda row: f"{path} episode {index['episode_index'][row]} frame {index['frame_index'][row]}"  # noqa: E731
            for c in INDEX_COLUMNS:
                columns[c].append(index[c].astype(np.int64))
            for feature in VECTOR_FEATURES.values():
                shape = tuple(self.features[feature]["shape"])
                columns[feature].append(_vectors(table.column(feature), int(np.prod(shape)), feature, where))
            has_ts = "timestamp" in table.column_names
            ts = _scalars(table.column("timestamp"), f"{path}: column timestamp") if has_ts else index["frame_index"] / self.fps
            columns["timestamp"].append(np.asarray(ts, np.float64))
            columns["file"].append(np.full(n, file_id, np.int32))
            columns["row"].append(np.arange(n, dtype=np.int64))
            unknown = np.flatnonzero(~np.isin(index["task_index"], list(self.tasks)))
            if unknown.size:
                row = unknown[0]
                known = f"{min(self.tasks)}..{max(self.tasks)}" if self.tasks else "none"
                raise ValueError(f"{where(row)}: task_index {index['task_index'][row]} is not in the task list (known: {known})")
        merged = {k: np.concatenate(v) if v else np.zeros(0) for k, v in columns.items()}
        if len(merged["episode_index"]) == 0:
            raise ValueError(f"{self.root}: empty dataset, the data files hold no frames")
        self.episode_index, self.frame_index, self.task_index = (merged[c] for c in INDEX_COLUMNS)
        self.timestamp, self._file, self._row = merged["timestamp"], merged["file"], merged["row"]
        self.state = merged[VECTOR_FEATURES["observation/state"]]
        self.actions = merged[VECTOR_FEATURES["actions"]]
        self._check_episodes()
        self._episode_end = _episode_ends(self.episode_index)

    def _check_episodes(self) -> None:
        """Frames of an episode must be contiguous, in order, and as many as the metadata says."""
        ep, frame = self.episode_index, self.frame_index
        starts = np.flatnonzero(np.r_[True, ep[1:] != ep[:-1]])
        ends = np.r_[starts[1:], len(ep)] - 1
        seen = set()
        for start, end in zip(starts, ends):
            episode = int(ep[start])
            where = f"{self.files[self._file[start]]} episode {episode}"
            if episode in seen:
                raise ValueError(f"{where}: frames of this episode are not contiguous (it appears twice)")
            seen.add(episode)
            expected = np.arange(end - start + 1)
            if not np.array_equal(frame[start : end + 1], expected):
                bad = int(np.flatnonzero(frame[start : end + 1] != expected)[0])
                raise ValueError(f"{where} frame {frame[start + bad]}: expected frame_index {bad} at this row (frames 0..n-1 in order)")
            if episode not in self._episodes:
                raise ValueError(f"{where}: episode not listed in the episode metadata")
            length = self._episodes[episode].get("length")
            if length is not None and int(length) != end - start + 1:
                raise ValueError(f"{where}: metadata says {length} frames, the data has {end - start + 1}")
        absent = sorted(set(self._episodes) - seen)
        if absent:
            raise ValueError(f"{self.root}: episode(s) {absent[:5]} listed in the metadata have no frames in the data")

    def _select(self, tasks: tuple[str, ...]) -> None:
        """Keep the episodes whose frames carry one of `tasks` (whole episodes, so chunks stay intact)."""
        index = {text: i for i, text in self.tasks.items()}
        missing = [t for t in tasks if t not in index]
        if missing:
            raise ValueError(f"{self.root}: task(s) {missing} selected by data.suites / data.tasks are not in the "
                             f"dataset's task list ({len(index)} tasks: {sorted(index)[:5]}...)")
        episodes = np.unique(self.episode_index[np.isin(self.task_index, [index[t] for t in tasks])])
        keep = np.isin(self.episode_index, episodes)
        if not keep.any():
            raise ValueError(f"{self.root}: no episode of the selected tasks {list(tasks)} has frames")
        for name in ("episode_index", "frame_index", "task_index", "timestamp", "_file", "_row", "state", "actions"):
            setattr(self, name, getattr(self, name)[keep])
        self._episodes = {e: self._episodes[e] for e in episodes.tolist()}
        self._episode_end = _episode_ends(self.episode_index)

    @property
    def task_names(self) -> list[str]:
        """The task strings of the frames this source holds, sorted."""
        return sorted({self.tasks[int(i)] for i in np.unique(self.task_index)})

    def _parquet_image_features(self) -> list[str]:
        return [f for f in IMAGE_FEATURES.values() if self.features[f]["dtype"] == "image"]

    # ---- random access ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.episode_index)

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    def chunk_indices(self) -> np.ndarray:
        """(n, action_horizon) row indices of each frame's action chunk, clamped at its episode's end."""
        rows = np.arange(len(self))[:, None] + np.arange(self.action_horizon)
        return np.minimum(rows, self._episode_end[:, None])

    def where(self, i: int) -> str:
        return f"{self.files[self._file[i]]} episode {self.episode_index[i]} frame {self.frame_index[i]}"

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.root}: frame {i} out of range, the dataset has {len(self)} frames")
        chunk = np.minimum(np.arange(i, i + self.action_horizon), self._episode_end[i])
        sample = {key: self._image(i, feature) for key, feature in IMAGE_FEATURES.items()}
        sample["observation/state"] = self.state[i]
        sample["actions"] = self.actions[chunk]
        sample["prompt"] = self.tasks[int(self.task_index[i])]
        return sample

    def _image(self, i: int, feature: str) -> np.ndarray:
        if self.features[feature]["dtype"] == "video":
            image = self._video_frame(i, feature)
        else:
            data = self._image_bytes(i, feature)
            try:
                image = _images.decode_image(data)
            except ValueError as err:
                raise ValueError(f"{self.where(i)}: {feature}: {err}") from None
        expected = _hwc(self.features[feature])
        if expected is not None and image.shape != expected:
            raise ValueError(f"{self.where(i)}: {feature}: expected an image of shape {expected} (meta/info.json), got {image.shape}")
        return image

    def _image_bytes(self, i: int, feature: str) -> bytes:
        file_id, row = int(self._file[i]), int(self._row[i])
        starts, groups = self._row_group(file_id, row)
        value = groups[feature][row - starts]
        if not value.is_valid:
            raise ValueError(f"{self.where(i)}: {feature}: no image bytes stored (null)")
        return value.as_py()

    def _row_group(self, file_id: int, row: int) -> tuple[int, dict]:
        """(first row, {feature: arrow array of bytes}) of the row group holding `row`, cached per process.

        Under a global shuffle of a large dataset most reads miss the cache: one sample then costs one
        row-group read (LeRobot/HF write 100 frames per group, ~13 MB of PNG for LIBERO). Files are
        opened per read, so a process never holds thousands of descriptors. The lock guards the
        cache only; reading runs outside it so that threads overlap their I/O.
        """
        if self._lock is None:
            self._lock, self._offsets, self._groups, self._cache_bytes = threading.Lock(), {}, collections.OrderedDict(), 0
        path = self.files[file_id]
        offsets = self._offsets.get(file_id)
        if offsets is None:
            metadata = _parquet(pq.read_metadata, path)
            offsets = np.cumsum([0] + [metadata.row_group(k).num_rows for k in range(metadata.num_row_groups)])
            self._offsets[file_id] = offsets
        key = (file_id, int(np.searchsorted(offsets, row, side="right") - 1))
        with self._lock:
            if key in self._groups:
                self._groups.move_to_end(key)
                return self._groups[key]
        table = _parquet(_read_row_group, path, key[1], self._parquet_image_features())
        hit = (int(offsets[key[1]]), {f: _image_column(table.column(f), f"{path}: column {f}") for f in table.column_names})
        with self._lock:
            if key not in self._groups:  # another thread may have read it meanwhile
                self._groups[key] = hit
                self._cache_bytes += _nbytes(hit)
            while self._cache_bytes > ROW_GROUP_CACHE_BYTES and len(self._groups) > 1:
                self._cache_bytes -= _nbytes(self._groups.popitem(last=False)[1])
        return hit

    def _video_frame(self, i: int, feature: str) -> np.ndarray:
        from eqx_pi05.data import video  # PyAV only when a video feature is read

        episode = self._episodes[int(self.episode_index[i])]
        if self.version == "v3.0":
            path = self._v3_path(
                "video_path", episode[f"videos/{feature}/chunk_index"], episode[f"videos/{feature}/file_index"], video_key=feature
            )
            offset = float(episode[f"videos/{feature}/from_timestamp"])
        else:
            path, offset = self._v2_path("video_path", int(self.episode_index[i]), video_key=feature), 0.0
        try:
            return video.decode_frame(path, offset + float(self.timestamp[i]), tolerance=0.5 / self.fps)
        except (ValueError, OSError) as err:
            raise ValueError(f"{self.where(i)}: {feature}: {err}") from None

    def __getstate__(self):  # worker processes rebuild caches and file handles themselves
        return {k: v for k, v in self.__dict__.items() if k not in ("_offsets", "_groups", "_cache_bytes")} | {"_lock": None}

    def __repr__(self) -> str:
        return f"LeRobotSource({str(self.root)!r}, {self.version}, {len(self)} frames, {self.num_episodes} episodes)"


# ---- metadata -------------------------------------------------------------------------------------


def _parquet(read, path: pathlib.Path, *args, **kw):
    """`read(path, ...)`, with a damaged file's error naming the file."""
    try:
        return read(path, *args, **kw)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({type(err).__name__}: {err}); the file is damaged or cut short") from None


def _read_row_group(path: pathlib.Path, group: int, columns: list[str]) -> pa.Table:
    with pq.ParquetFile(path, memory_map=True) as parquet:
        return parquet.read_row_group(group, columns=columns)


def _jsonl(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (LeRobot v2.x metadata)")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not JSON: {err}") from None
    return rows


def _tasks_v2(root: pathlib.Path) -> dict[int, str]:
    return {int(r["task_index"]): r["task"] for r in _jsonl(root / "meta" / "tasks.jsonl")}


def _episodes_v2(root: pathlib.Path) -> dict[int, dict]:
    return {int(r["episode_index"]): r for r in _jsonl(root / "meta" / "episodes.jsonl")}


def _tasks_v3(root: pathlib.Path) -> dict[int, str]:
    path = root / "meta" / "tasks.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (LeRobot v3.0 metadata)")
    table = _parquet(pq.read_table, path)
    # pandas writes the task strings as its index; by name ("task") or as __index_level_0__.
    text = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
    if text is None or "task_index" not in table.column_names:
        raise ValueError(f"{path}: expected columns task_index and task, found {table.column_names}")
    return dict(zip(table.column("task_index").to_pylist(), table.column(text).to_pylist()))


def _episodes_v3(root: pathlib.Path) -> dict[int, dict]:
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root / 'meta' / 'episodes'}: no chunk-*/file-*.parquet (LeRobot v3.0 metadata)")
    episodes = {}
    for path in files:
        table = _parquet(pq.read_table, path)
        keep = [c for c in table.column_names if not c.startswith("stats/")]
        for c in ("episode_index", "data/chunk_index", "data/file_index"):
            if c not in keep:
                raise ValueError(f"{path}: missing column {c}; the file has {keep}")
        for row in table.select(keep).to_pylist():
            episodes[int(row["episode_index"])] = row
    return episodes


# ---- column conversion ----------------------------------------------------------------------------


def _episode_ends(episode_index: np.ndarray) -> np.ndarray:
    """For each row, the row of the last frame of its episode (episodes are contiguous runs of rows)."""
    starts = np.flatnonzero(np.r_[True, episode_index[1:] != episode_index[:-1]])
    ends = np.r_[starts[1:], len(episode_index)] - 1
    return np.repeat(ends, ends - starts + 1)


def _scalars(column: pa.ChunkedArray, where: str) -> np.ndarray:
    array = column.combine_chunks()
    if pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type) or pa.types.is_large_list(array.type):
        array = array.flatten()  # LeRobot declares shape [1]; some writers store a 1-list
    if array.null_count:
        raise ValueError(f"{where}: {array.null_count} null value(s)")
    if len(array) != len(column):
        raise ValueError(f"{where}: expected one value per row, got {len(array)} values for {len(column)} rows")
    return array.to_numpy(zero_copy_only=False)


def _vectors(column: pa.ChunkedArray, dim: int, feature: str, where) -> np.ndarray:
    """A list column -> float32 (n, dim); wrong lengths, nulls and non-finite values are errors."""
    array = column.combine_chunks()
    if not (pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type) or pa.types.is_large_list(array.type)):
        raise ValueError(f"{where(0)}: {feature}: expected a list column of {dim} floats, got type {array.type}")
    lengths = pc.fill_null(pc.list_value_length(array), -1).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != dim)
    if bad.size:
        got = "null" if lengths[bad[0]] < 0 else f"{lengths[bad[0]]} values"
        raise ValueError(f"{where(bad[0])}: {feature}: expected {dim} values, got {got}")
    values = array.flatten()
    if values.null_count:
        row = int(np.flatnonzero(pc.is_null(values).to_numpy(zero_copy_only=False))[0]) // dim
        raise ValueError(f"{where(row)}: {feature}: null value inside the vector")
    vectors = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(array), dim)
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise ValueError(f"{where(bad[0])}: {feature}: non-finite value(s) {vectors[bad[0]].tolist()}")
    return vectors


def _image_column(column: pa.ChunkedArray, where: str) -> pa.Array:
    array = column.combine_chunks()
    if pa.types.is_struct(array.type):
        if array.type.get_field_index("bytes") < 0:
            raise ValueError(f"{where}: expected an image struct {{bytes, path}}, got {array.type}")
        array = pc.struct_field(array, "bytes")
    if not (pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type)):
        raise ValueError(f"{where}: expected encoded image bytes, got type {array.type}")
    return array


def _nbytes(cached_group: tuple[int, dict]) -> int:
    return sum(array.nbytes for array in cached_group[1].values())


def _hwc(feature: dict) -> tuple[int, int, int] | None:
    shape, names = feature.get("shape"), feature.get("names") or []
    if not shape or len(shape) != 3:
        return None
    if names and names[0] in ("channel", "channels"):
        return (shape[1], shape[2], shape[0])
    return tuple(shape)
