import json

import numpy as np
import pytest

from eqx_pi05.data import norm_stats
from eqx_pi05.data.lerobot import LeRobotSource
from eqx_pi05.data.lerobot_write import Episode, write_dataset


def _episode(task, actions):
    n = len(actions)
    frames = np.zeros((n, 4, 4, 3), np.uint8)
    state = np.tile(np.arange(8, dtype=np.float32), (n, 1)) + np.arange(n, dtype=np.float32)[:, None]
    return Episode(task, frames, frames, state, np.asarray(actions, np.float32))


def test_stats_are_mean_std_and_one_ninety_nine_percentiles():
    x = np.random.default_rng(0).normal(size=(5000, 3)) * [1.0, 2.0, 3.0] + [0.0, 1.0, -1.0]
    stats = norm_stats.compute(x)
    np.testing.assert_allclose(stats.mean, x.mean(0))
    np.testing.assert_allclose(stats.std, x.std(0))
    np.testing.assert_allclose(stats.q01, np.quantile(x, 0.01, axis=0))
    np.testing.assert_allclose(stats.q99, np.quantile(x, 0.99, axis=0))
    with pytest.raises(ValueError, match="at least 2 vectors"):
        norm_stats.compute(np.zeros((1, 3)))


def test_action_stats_count_every_frame_of_every_action_chunk(tmp_path):
    # One episode, actions 0, 1, 2 (per dim); chunks of 2 clamp at the end: [0,1], [1,2], [2,2].
    actions = np.repeat(np.arange(3, dtype=np.float32)[:, None], 7, axis=1)
    root = write_dataset(tmp_path / "ds", [_episode(0, actions)], ["t"])
    stats = norm_stats.compute_dataset_stats(LeRobotSource(root, action_horizon=2))
    np.testing.assert_allclose(stats["actions"].mean, np.full(7, 8 / 6))
    np.testing.assert_allclose(stats["state"].mean, np.arange(8) + 1.0)


def test_saved_file_has_openpi_layout_and_loads_back(tmp_path):
    stats = {"state": norm_stats.compute(np.random.default_rng(1).normal(size=(50, 8))),
             "actions": norm_stats.compute(np.random.default_rng(2).normal(size=(50, 7)))}
    path = norm_stats.save(stats, tmp_path / "norm_stats.json")
    data = json.loads(path.read_text())
    assert sorted(data) == ["norm_stats"]
    assert sorted(data["norm_stats"]["state"]) == ["mean", "q01", "q99", "std"]
    loaded = norm_stats.load(path)
    for key in ("state", "actions"):
        for field in ("mean", "std", "q01", "q99"):
            np.testing.assert_array_equal(getattr(loaded[key], field), getattr(stats[key], field))


def test_openpi_file_with_extra_keys_loads(tmp_path):
    entry = lambda d: {"mean": [0.0] * d, "std": [1.0] * d, "q01": [-2.0] * d, "q99": [2.0] * d}  # noqa: E731
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps({"norm_stats": {"state": entry(8), "actions": entry(7), "extra": entry(3)}}, indent=2))
    stats = norm_stats.load(path)
    np.testing.assert_array_equal(stats["actions"].q99, np.full(7, 2.0))


def test_missing_quantiles_are_an_error_naming_the_key(tmp_path):
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps({"norm_stats": {"state": {"mean": [0.0], "std": [1.0], "q01": None, "q99": None},
                                               "actions": {"mean": [0.0], "std": [1.0], "q01": [0.0], "q99": [1.0]}}}))
    with pytest.raises(ValueError, match=r"state lacks \['q01', 'q99'\]"):
        norm_stats.load(path)
    path.write_text(json.dumps({"state": {}}))
    with pytest.raises(ValueError, match="top-level 'norm_stats' key"):
        norm_stats.load(path)


def test_cli_writes_stats_next_to_the_dataset(tmp_path):
    root = write_dataset(tmp_path / "ds", [_episode(0, np.ones((5, 7))), _episode(0, np.zeros((4, 7)))], ["t"])
    norm_stats.main(root, output=None, action_horizon=3)
    loaded = norm_stats.load(root / "norm_stats.json")
    np.testing.assert_allclose(loaded["state"].mean, norm_stats.compute(LeRobotSource(root, 3).state).mean)
