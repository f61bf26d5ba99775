import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eqx_pi05.data.images import decode_image
from eqx_pi05.data.lerobot import LeRobotSource
from eqx_pi05.data.lerobot_write import Episode, write_dataset
from eqx_pi05.data.make_demo_dataset import LIBERO_SPATIAL_TASKS, MAX_STEP, make_demo_dataset

TASKS = ["pick up the bowl", "put the bowl on the plate", "open the drawer"]
H = 4


def _episodes(lengths=(6, 9, 5), size=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for e, n in enumerate(lengths):
        out.append(Episode(
            task_index=e % len(TASKS),
            image=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            wrist_image=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            state=rng.normal(size=(n, 8)).astype(np.float32),
            actions=rng.normal(size=(n, 7)).astype(np.float32),
        ))
    return out


def _rewrite_column(path, column, fn):
    table = pq.read_table(path)
    values = fn(table.column(column).to_pylist())
    i = table.column_names.index(column)
    pq.write_table(table.set_column(i, column, pa.array(values, table.schema.field(column).type)), path)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def small(tmp_path):
    return write_dataset(tmp_path / "ds", _episodes(), TASKS)


def test_demo_sample_is_the_parquet_row_in_client_keys(demo):
    source = LeRobotSource(demo, action_horizon=10)
    info = json.loads((demo / "meta" / "info.json").read_text())
    assert len(source) == info["total_frames"] and source.num_episodes == info["total_episodes"] == 20
    i = 37
    episode, frame = int(source.episode_index[i]), int(source.frame_index[i])
    row = pq.read_table(demo / f"data/chunk-000/episode_{episode:06d}.parquet").slice(frame, 1).to_pylist()[0]
    sample = source[i]
    assert sorted(sample) == ["actions", "observation/image", "observation/state", "observation/wrist_image", "prompt"]
    np.testing.assert_array_equal(sample["observation/image"], decode_image(row["image"]["bytes"]))
    np.testing.assert_array_equal(sample["observation/wrist_image"], decode_image(row["wrist_image"]["bytes"]))
    assert sample["observation/image"].shape == (256, 256, 3) and sample["observation/image"].dtype == np.uint8
    np.testing.assert_array_equal(sample["observation/state"], np.float32(row["state"]))
    np.testing.assert_array_equal(sample["actions"][0], np.float32(row["actions"]))
    assert sample["prompt"] == LIBERO_SPATIAL_TASKS[row["task_index"]]


def test_demo_metadata_says_synthetic_and_ships_tokenizer_and_norm_stats(demo):
    info = json.loads((demo / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v2.0" and info["source"].startswith("synthetic")
    assert (demo / "tokenizer.model").is_file() and (demo / "norm_stats.json").is_file()
    tasks = [json.loads(line)["task"] for line in (demo / "meta" / "tasks.jsonl").read_text().splitlines()]
    assert tasks == list(LIBERO_SPATIAL_TASKS)
    lengths = [json.loads(line)["length"] for line in (demo / "meta" / "episodes.jsonl").read_text().splitlines()]
    assert min(lengths) >= 20 and max(lengths) <= 40


def test_demo_images_show_the_gripper_where_the_state_says(demo):
    """The signal a policy learns from: the red gripper blob sits at the state's (x, y)."""
    source = LeRobotSource(demo, action_horizon=10)
    for i in (0, 100, 300, len(source) - 1):
        sample = source[i]
        image = sample["observation/image"].astype(int)
        red = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)
        rows, cols = np.nonzero(red)
        x, y = sample["observation/state"][:2]
        assert abs(cols.mean() - (x + 1) / 2 * 256) < 4 and abs(rows.mean() - (y + 1) / 2 * 256) < 4


def test_demo_actions_are_the_next_gripper_displacement(demo):
    source = LeRobotSource(demo, action_horizon=10)
    same_episode = source.episode_index[1:] == source.episode_index[:-1]
    step = source.state[1:, :3] - source.state[:-1, :3]
    np.testing.assert_allclose(step[same_episode], source.actions[:-1][same_episode, :3] * MAX_STEP, atol=1e-5)


def test_action_chunk_is_the_next_actions_padded_with_the_last_at_episode_end(small):
    source = LeRobotSource(small, action_horizon=H)
    episodes = _episodes()
    first = len(episodes[0])  # episode 1 starts here
    np.testing.assert_array_equal(source[first + 2]["actions"], episodes[1].actions[2:6])
    last = episodes[1].actions[-1]
    np.testing.assert_array_equal(source[first + 7]["actions"], [episodes[1].actions[7], last, last, last])
    np.testing.assert_array_equal(source[first + 8]["actions"], [last] * 4)
    np.testing.assert_array_equal(source.chunk_indices()[first + 7], [first + 7, first + 8, first + 8, first + 8])


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_v21_and_v30_layouts_read_the_same_as_v20(tmp_path, version):
    reference = LeRobotSource(write_dataset(tmp_path / "v20", _episodes(), TASKS), action_horizon=H)
    # Small row groups make one v3.0 file hold episodes across several groups.
    other = LeRobotSource(write_dataset(tmp_path / version, _episodes(), TASKS, version=version, row_group_size=4), action_horizon=H)
    assert other.version == version and len(other) == len(reference) == 20
    layout = sorted(str(p.relative_to(tmp_path / version)) for p in (tmp_path / version).rglob("*.*"))
    if version == "v3.0":
        assert layout == ["data/chunk-000/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet", "meta/info.json", "meta/tasks.parquet"]
    else:
        assert "meta/episodes_stats.jsonl" in layout
    for i in range(len(reference)):
        a, b = reference[i], other[i]
        assert a["prompt"] == b["prompt"]
        for key in ("observation/image", "observation/wrist_image", "observation/state", "actions"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{version} frame {i} {key}")


def test_row_group_cache_stays_within_its_budget_and_reads_stay_right(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "ds", _episodes(), TASKS, version="v3.0", row_group_size=3)
    expected = [LeRobotSource(root, H)[i]["observation/image"] for i in range(20)]
    monkeypatch.setattr("eqx_pi05.data.lerobot.ROW_GROUP_CACHE_BYTES", 2000)  # about two groups of 16x16 PNGs
    source = LeRobotSource(root, H)
    for i in np.random.default_rng(0).permutation(20).tolist() * 2:
        np.testing.assert_array_equal(source[i]["observation/image"], expected[i])
        assert 1 <= len(source._groups) <= 3 and source._cache_bytes <= 2000 + max(
            sum(a.nbytes for a in g[1].values()) for g in source._groups.values())


def test_source_pickles_for_worker_processes(small):
    source = LeRobotSource(small, action_horizon=H)
    source[3]  # fills the per-process cache, which must not travel
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone[11]["observation/image"], source[11]["observation/image"])


def test_video_features_decode_through_pyav(tmp_path):
    av = pytest.importorskip("av", reason="PyAV (the `libero` extra) is needed for mp4 video features")
    root = write_dataset(tmp_path / "v3", _episodes(lengths=(5, 7), size=32), TASKS, version="v3.0")
    reference = LeRobotSource(root, action_horizon=H)
    # Turn `wrist_image` into a video feature: both episodes concatenated in one mp4, as LeRobot 3.0 does.
    frames = np.concatenate([e.wrist_image for e in _episodes(lengths=(5, 7), size=32)])
    path = root / "videos/wrist_image/chunk-000/file-000.mp4"
    path.parent.mkdir(parents=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "rgb24"
        stream.options = {"crf": "0", "preset": "ultrafast"}  # lossless, so frames compare exactly
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    meta = root / "meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(meta)
    for name, values in (("videos/wrist_image/chunk_index", [0, 0]), ("videos/wrist_image/file_index", [0, 0]),
                         ("videos/wrist_image/from_timestamp", [0.0, 0.5]), ("videos/wrist_image/to_timestamp", [0.5, 1.2])):
        table = table.append_column(name, pa.array(values))
    pq.write_table(table, meta)
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["wrist_image"]["dtype"] = "video"
    (root / "meta/info.json").write_text(json.dumps(info))
    video = LeRobotSource(root, action_horizon=H)
    for i in (0, 4, 5, 11):
        np.testing.assert_array_equal(video[i]["observation/wrist_image"], reference[i]["observation/wrist_image"])


def test_dataset_written_by_lerobot_reads_the_same(tmp_path):
    lerobot = pytest.importorskip("lerobot.datasets.lerobot_dataset", reason="the `lerobot` package is not installed (it needs Python >= 3.12 and torch)")
    features = {
        "image": {"dtype": "image", "shape": (16, 16, 3), "names": ["height", "width", "channel"]},
        "wrist_image": {"dtype": "image", "shape": (16, 16, 3), "names": ["height", "width", "channel"]},
        "state": {"dtype": "float32", "shape": (8,), "names": ["state"]},
        "actions": {"dtype": "float32", "shape": (7,), "names": ["actions"]},
    }
    dataset = lerobot.LeRobotDataset.create("local/test", fps=10, root=tmp_path / "lr", features=features, use_videos=False)
    episodes = _episodes()
    for e in episodes:
        for t in range(len(e)):
            dataset.add_frame({"image": e.image[t], "wrist_image": e.wrist_image[t], "state": e.state[t],
                               "actions": e.actions[t], "task": TASKS[e.task_index]})
        dataset.save_episode()
    dataset.finalize()
    source = LeRobotSource(tmp_path / "lr", action_horizon=H)
    ours = LeRobotSource(write_dataset(tmp_path / "ours", episodes, TASKS), action_horizon=H)
    for i in range(len(ours)):
        for key in ("observation/image", "observation/state", "actions"):
            np.testing.assert_array_equal(source[i][key], ours[i][key])
        assert source[i]["prompt"] == ours[i]["prompt"]


# ---- bad input never passes silently ------------------------------------------------------------


def _episode_file(root, e):
    return root / f"data/chunk-000/episode_{e:06d}.parquet"


def test_unknown_version_names_the_version_found(small):
    info = json.loads((small / "meta/info.json").read_text())
    info["codebase_version"] = "v1.6"
    (small / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"codebase_version 'v1.6' is not supported; this reader takes v2.0, v2.1, v3.0"):
        LeRobotSource(small, H)


def test_invalid_info_json_names_the_file(small):
    (small / "meta/info.json").write_text('{"codebase_version": "v2.1", "fps": ')
    with pytest.raises(ValueError, match=rf"{small}/meta/info.json: not valid JSON \(Expecting value: line 1"):
        LeRobotSource(small, H)


def test_truncated_parquet_names_the_file(small):
    path = _episode_file(small, 1)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=rf"{path}: not a readable parquet file \(.*\); the file is damaged or cut short"):
        LeRobotSource(small, H)


def test_missing_column_names_file_and_column(small):
    path = _episode_file(small, 1)
    pq.write_table(pq.read_table(path).drop_columns(["state"]), path)
    with pytest.raises(ValueError, match=rf"{path}: missing column\(s\) \['state'\]"):
        LeRobotSource(small, H)


def test_wrong_vector_length_names_file_episode_and_frame(small):
    path = _episode_file(small, 1)
    _rewrite_column(path, "state", lambda rows: [r if i != 3 else r[:7] for i, r in enumerate(rows)])
    with pytest.raises(ValueError, match=rf"{path} episode 1 frame 3: state: expected 8 values, got 7 values"):
        LeRobotSource(small, H)


def test_nan_in_actions_names_file_episode_and_frame(small):
    path = _episode_file(small, 2)
    _rewrite_column(path, "actions", lambda rows: [r if i != 4 else [float("nan")] * 7 for i, r in enumerate(rows)])
    with pytest.raises(ValueError, match=rf"{path} episode 2 frame 4: actions: non-finite value"):
        LeRobotSource(small, H)


def test_unknown_task_index_names_file_episode_and_frame(small):
    path = _episode_file(small, 0)
    _rewrite_column(path, "task_index", lambda rows: [r if i != 5 else 99 for i, r in enumerate(rows)])
    with pytest.raises(ValueError, match=rf"{path} episode 0 frame 5: task_index 99 is not in the task list \(known: 0..2\)"):
        LeRobotSource(small, H)


def test_undecodable_image_names_file_episode_and_frame(small):
    path = _episode_file(small, 1)
    _rewrite_column(path, "image", lambda rows: [r if i != 2 else {"bytes": b"garbage", "path": None} for i, r in enumerate(rows)])
    source = LeRobotSource(small, H)
    source[len(_episodes()[0]) + 1]  # neighbours decode fine
    with pytest.raises(ValueError, match=rf"{path} episode 1 frame 2: image: undecodable image \(7 bytes\)"):
        source[len(_episodes()[0]) + 2]


def test_image_of_the_wrong_size_names_file_episode_and_frame(tmp_path):
    root = write_dataset(tmp_path / "ds", _episodes(), TASKS)
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["image"]["shape"] = [256, 256, 3]
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"episode 0 frame 0: image: expected an image of shape \(256, 256, 3\).*got \(16, 16, 3\)"):
        LeRobotSource(root, H)[0]


def test_empty_dataset_is_an_error(small):
    (small / "meta/episodes.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty dataset"):
        LeRobotSource(small, H)


def test_frames_out_of_order_are_an_error(small):
    path = _episode_file(small, 1)
    _rewrite_column(path, "frame_index", lambda rows: [rows[1], rows[0], *rows[2:]])
    with pytest.raises(ValueError, match=rf"{path} episode 1 frame 1: expected frame_index 0"):
        LeRobotSource(small, H)


def test_missing_episode_file_is_an_error(small):
    _episode_file(small, 2).unlink()
    with pytest.raises(FileNotFoundError, match="episode_000002.parquet listed by the metadata is missing"):
        LeRobotSource(small, H)
