"""Which episodes train: a suite or a task list selects whole episodes before shuffling and norm
stats, on a small dataset holding two LIBERO suites (laid out like physical-intelligence/libero);
the norm-stats command takes the same option, training refuses stats of another selection, and
--resume refuses a changed selection."""

import dataclasses
import pathlib

import numpy as np
import pytest

from eqx_pi05.data import norm_stats
from eqx_pi05.data.data_config import DataConfig
from eqx_pi05.data.episodes import LIBERO_SUITES, selected_tasks
from eqx_pi05.data.lerobot import LeRobotSource
from eqx_pi05.data.lerobot_write import Episode, write_dataset
from eqx_pi05.data.make_demo_dataset import EXTRA_TEXT
from eqx_pi05.data.pipeline import batched_stream, make_data_loader
from eqx_pi05.data.tokenizer import train_sentencepiece
from eqx_pi05.variants import VARIANTS
from eqx_pi05.train.loop import check_resume_config

H = 3
SPATIAL, GOAL = LIBERO_SUITES["libero_spatial"], LIBERO_SUITES["libero_goal"]
TASKS = [*SPATIAL, *GOAL]  # task_index 0-9 spatial, 10-19 goal


@pytest.fixture(scope="module")
def two_suites(tmp_path_factory) -> pathlib.Path:
    """Two episodes per task (3-6 frames, 8x8 images); goal states sit around +5, spatial around 0."""
    rng = np.random.default_rng(0)
    episodes = []
    for e in range(2 * len(TASKS)):
        task, n = e % len(TASKS), int(rng.integers(3, 7))
        episodes.append(Episode(
            task_index=task,
            image=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
            wrist_image=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
            state=(rng.normal(size=(n, 8)) + (5.0 if task >= 10 else 0.0)).astype(np.float32),
            actions=rng.normal(size=(n, 7)).astype(np.float32),
        ))
    root = write_dataset(tmp_path_factory.mktemp("libero") / "ds", episodes, TASKS)
    train_sentencepiece([*TASKS, EXTRA_TEXT], root / "tokenizer.model")
    return root


def test_suite_tables_are_liberos_task_language():
    benchmark = pytest.importorskip("libero.libero.benchmark")
    for suite, tasks in LIBERO_SUITES.items():
        assert tasks == tuple(t.language for t in benchmark.task_maps[suite].values()), suite


def test_a_suite_selects_its_episodes_whole_with_their_chunks(two_suites):
    full = LeRobotSource(two_suites, H)
    goal = LeRobotSource(two_suites, H, selected_tasks(("libero_goal",), ()))
    assert goal.task_names == sorted(GOAL) and goal.num_episodes == 20 and full.num_episodes == 40
    rows = np.flatnonzero(full.task_index >= 10)
    assert len(goal) == len(rows) < len(full)
    for i, row in enumerate(rows):  # every frame, with its action chunk cut at its own episode's end
        a, b = goal[i], full[int(row)]
        assert a["prompt"] == b["prompt"] in GOAL
        np.testing.assert_array_equal(a["actions"], b["actions"])
        np.testing.assert_array_equal(a["observation/image"], b["observation/image"])


def test_a_task_list_selects_those_tasks_and_shuffling_runs_over_the_selection(two_suites):
    picked = (GOAL[3], SPATIAL[7])
    source = LeRobotSource(two_suites, H, picked)
    assert source.task_names == sorted(picked) and source.num_episodes == 4
    stream = batched_stream(source, lambda sample, index: {"prompt": sample["prompt"], "state": sample["observation/state"]},
                            batch_size=1, seed=0, shuffle=True, num_epochs=1, num_workers=0, process_index=0, process_count=1)
    seen = [(b["prompt"][0], tuple(b["state"][0])) for b in stream]
    assert sorted(seen) == sorted((source[i]["prompt"], tuple(source.state[i])) for i in range(len(source)))


def test_a_selection_that_the_dataset_cannot_serve_fails_naming_it(two_suites):
    with pytest.raises(ValueError, match="pick up the alphabet soup and place it in the basket"):
        LeRobotSource(two_suites, H, selected_tasks(("libero_object",), ()))
    with pytest.raises(ValueError, match="data.suites=.*data.tasks=.*not both"):
        DataConfig(dataset=two_suites, tokenizer=two_suites, norm_stats=two_suites, suites=("libero_goal",), tasks=(SPATIAL[0],))
    with pytest.raises(ValueError, match="unknown suite"):
        selected_tasks(("libero_90",), ())


def test_norm_stats_are_computed_on_the_selection_and_training_refuses_stats_of_another(two_suites, tmp_path):
    norm_stats.main(two_suites, output=tmp_path / "goal.json", action_horizon=H, suites=("libero_goal",))
    norm_stats.main(two_suites, output=tmp_path / "all.json", action_horizon=H)
    goal, everything = norm_stats.load(tmp_path / "goal.json"), norm_stats.load(tmp_path / "all.json")
    full = LeRobotSource(two_suites, H)
    np.testing.assert_allclose(goal["state"].mean, full.state[full.task_index >= 10].mean(0), rtol=1e-6)
    assert np.all(goal["state"].mean > 4) and np.all(everything["state"].mean < 4)  # goal states sit at +5
    assert norm_stats.recorded_tasks(tmp_path / "goal.json") == sorted(GOAL)

    cfg = DataConfig(dataset=two_suites, tokenizer=two_suites / "tokenizer.model", norm_stats=tmp_path / "goal.json",
                     action_horizon=H, max_token_len=32, batch_size=2, num_workers=0, suites=("libero_goal",))
    batch = next(iter(make_data_loader(cfg, process_index=0, process_count=1)))
    assert batch["state"].shape == (2, 32)
    for stats, suites in (("all.json", ("libero_goal",)), ("goal.json", ("libero_spatial",)), ("goal.json", ())):
        bad = dataclasses.replace(cfg, norm_stats=tmp_path / stats, suites=suites)
        with pytest.raises(ValueError, match=r"norm stats .* were computed on the episodes of .* --suites/--tasks"):
            make_data_loader(bad, process_index=0, process_count=1)


def test_the_reports_variants_train_on_libero_spatial_and_resume_refuses_another_selection():
    assert VARIANTS["pi05_libero"].data.selected_tasks is None  # openpi: all four suites
    for name, cfg in VARIANTS.items():
        if name != "pi05_libero":
            assert cfg.data.selected_tasks == SPATIAL, name
    cfg = VARIANTS["wristonly_physdrop"]
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, suites=("libero_goal",)))
    with pytest.raises(ValueError, match=r"data.suites: checkpoint \['libero_spatial'\], now \['libero_goal'\]"):
        check_resume_config(cfg, other)
