"""A whole evaluation run on the fake simulator: resume, results files, report table, evaluate.py."""

import importlib.util
import json
import logging
import pathlib
import sys

import numpy as np
import pytest

from eqx_pi05.eval import report, results
from eqx_pi05.eval.audit import RemovalAuditError
from fake_sim import FakeEnv, fake_tasks, homing_policy
from eqx_pi05.eval.rollout import noise_seed
from eqx_pi05.eval.run import EvalConfig, PolicyInfo, evaluate


REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = fake_tasks(3)
REMOVE = PolicyInfo("wristonly_physdrop", "full-FT", "view_remove (physical)", "ckpt/B2",
                    view_remove_eval={"agentview": 1.0})


def wrist_only_policy(observations):
    """Honours the removal of agentview: it only reads the state and the wrist image."""
    out = homing_policy(observations)
    for chunk, obs in zip(out, observations):
        chunk[:, 3] = obs["observation/wrist_image"].mean() / 255.0
    return out


class StopAfter:
    """A policy that raises after `calls` calls, like a run killed part-way."""

    def __init__(self, calls):
        self.left = calls

    def __call__(self, observations):
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt("killed")
        return wrist_only_policy(observations)


def _config(tmp_path, name, **kw):
    return EvalConfig(**{"n": 7, "suite": "libero_spatial", "output_dir": tmp_path / name, "max_steps": 25,
                         "videos": 2, **kw})


def _episodes(out):
    return sorted((r.task, r.trial, r.success, r.steps) for r in results.load_episodes(out))


def test_resumed_run_skips_done_episodes_and_ends_with_the_uninterrupted_results(tmp_path):
    whole = evaluate(_config(tmp_path, "whole"), wrist_only_policy, REMOVE, TASKS, FakeEnv)
    cut = _config(tmp_path, "cut")
    with pytest.raises(KeyboardInterrupt):
        evaluate(cut, StopAfter(12), REMOVE, TASKS, FakeEnv)
    done_before = _episodes(cut.output_dir)
    assert 0 < len(done_before) < 7
    calls = []
    resumed = evaluate(cut, lambda obs: calls.extend(obs) or wrist_only_policy(obs), REMOVE, TASKS, FakeEnv)
    assert resumed["episodes_this_invocation"] == 7 - len(done_before)
    ran = {o["noise_seed"] for o in calls}
    audit = noise_seed(0, 0, 0)  # the removal audit queries the policy with task 0 trial 0's first observation
    assert not ran & ({noise_seed(t, e, 0) for t, e, _, _ in done_before} - {audit})  # done ones not rerun
    assert {noise_seed(t, e, 0) for t, e, _, _ in _episodes(cut.output_dir)} - {audit} <= ran | {
        noise_seed(t, e, 0) for t, e, _, _ in done_before}
    assert _episodes(cut.output_dir) == _episodes(tmp_path / "whole")
    assert resumed["total"] == whole["total"]


def test_rerunning_a_finished_evaluation_runs_no_episode(tmp_path):
    evaluate(_config(tmp_path, "a"), wrist_only_policy, REMOVE, TASKS, FakeEnv)
    again = evaluate(_config(tmp_path, "a"), wrist_only_policy, REMOVE, TASKS, FakeEnv)
    assert again["episodes_this_invocation"] == 0 and again["total"]["episodes"] == 7


def test_resume_refuses_an_output_dir_of_another_evaluation(tmp_path):
    evaluate(_config(tmp_path, "a"), wrist_only_policy, REMOVE, TASKS, FakeEnv)
    with pytest.raises(ValueError, match="max_steps"):
        evaluate(_config(tmp_path, "a", max_steps=30), wrist_only_policy, REMOVE, TASKS, FakeEnv)


def test_failed_removal_audit_stops_the_run_before_any_episode_and_is_logged(tmp_path):
    def reads_agentview(observations):
        out = wrist_only_policy(observations)
        out[:, :, 4] = np.mean([o["observation/image"].mean() for o in observations])
        return out

    with pytest.raises(RemovalAuditError):
        evaluate(_config(tmp_path, "leak"), reads_agentview, REMOVE, TASKS, FakeEnv)
    assert "eval physical view-removal {agentview=1} audit=FAIL" in (tmp_path / "leak" / "eval.log").read_text()
    assert results.load_episodes(tmp_path / "leak") == []


def test_a_last_line_cut_by_a_kill_is_dropped_and_earlier_lines_kept(tmp_path):
    r = results.EpisodeResult(task=1, trial=2, success=True, steps=9, seconds=1.5)
    results.append_episode(tmp_path, r)
    with open(tmp_path / results.EPISODES, "a") as f:
        f.write('{"task": 1, "tri')
    assert results.load_episodes(tmp_path) == [r]
    assert (tmp_path / results.EPISODES).read_text().endswith("\n")


def test_results_files_report_per_task_and_total_success_with_counts(tmp_path):
    res = evaluate(_config(tmp_path, "run", n=6), wrist_only_policy, REMOVE, TASKS, FakeEnv)
    out = tmp_path / "run"
    eps = results.load_episodes(out)
    wins = sum(r.success for r in eps)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["total"]["successes"] == wins and on_disk["total"]["episodes"] == 6
    assert on_disk["total"]["text"] == f"{100 * wins / 6:.1f}% ({wins}/6)"
    assert [row["episodes"] for row in on_disk["per_task"]] == [2, 2, 2]
    assert on_disk["mechanism"] == "view_remove (physical)" and on_disk == json.loads(json.dumps(res))
    md = (out / "results.md").read_text()
    assert f"| **all** | | **{on_disk['total']['text']}** |" in md
    assert f"| 1 | {TASKS[1].language} | {on_disk['per_task'][1]['text']} |" in md
    assert (out / "success_per_task.png").read_bytes()[:4] == b"\x89PNG"
    assert "eval physical view-removal {agentview=1} audit=pass" in (out / "eval.log").read_text()
    videos = sorted(p.name for p in (out / "videos").iterdir())
    assert len(videos) == 2 and videos[0].startswith("task00_trial00_") and videos[1].startswith("task01_trial00_")


def test_video_shows_both_cameras_side_by_side_with_the_removed_one_grey(tmp_path):
    import imageio.v3 as iio

    evaluate(_config(tmp_path, "run", n=1, videos=1), wrist_only_policy, REMOVE, TASKS, FakeEnv)
    (video,) = (tmp_path / "run" / "videos").iterdir()
    frames = iio.imread(video, plugin="pyav")
    assert frames.shape[1:] == (256, 512, 3) and len(frames) > 10
    left = frames[..., :256, :].astype(int)
    assert np.abs(left - left[..., :1]).max() <= 12  # grey: the channels agree (up to video compression)


def test_episodes_are_spread_evenly_over_tasks_and_capped_by_the_initial_states():
    assert results.episodes_per_task(500, 10, 50) == [50] * 10
    assert results.episodes_per_task(12, 10, 50) == [2, 2] + [1] * 8
    with pytest.raises(ValueError, match="only 50 fixed initial states"):
        results.episodes_per_task(510, 10, 50)


def test_report_builds_the_results_table_from_several_runs(tmp_path):
    evaluate(_config(tmp_path, "B2_physdrop", n=3), wrist_only_policy, REMOVE, TASKS, FakeEnv)
    dropout = PolicyInfo("wristonly_zero", "full-FT", "view_dropout (zeros)", "ckpt/B1",
                         view_dropout_train={"agentview": 1.0})
    evaluate(_config(tmp_path, "B1_zero", n=3), wrist_only_policy, dropout, TASKS, FakeEnv)
    text = report.main([tmp_path / "B2_physdrop", tmp_path / "B1_zero"], output=tmp_path / "table")
    rows = [line for line in text.splitlines() if line.startswith("| wristonly")]
    b2 = json.loads((tmp_path / "B2_physdrop" / "results.json").read_text())["total"]["text"]
    assert rows[0] == f"| wristonly_physdrop | full-FT | view_remove (physical) | {b2} | B2_physdrop · audit=pass |"
    assert rows[1].startswith("| wristonly_zero | full-FT | view_dropout (zeros) |") and rows[1].endswith("| B1_zero |")
    assert (tmp_path / "table.md").read_text() == text
    assert (tmp_path / "table.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_py_runs_with_an_injected_policy_and_refuses_half_an_injection(tmp_path):
    cli = _cli()
    flags = ["--checkpoint", str(tmp_path / "ckpt"), "--n", "2", "--max-steps", "5", "--videos", "0"]
    args = cli.parse([*flags, "--output-dir", str(tmp_path / "out")])
    res = cli.main(args, wrist_only_policy, REMOVE, tasks=TASKS, make_env=FakeEnv)
    assert res["total"]["episodes"] == 2
    with pytest.raises(ValueError, match="both"):
        cli.main(args, wrist_only_policy, None)
    sub = cli.main(cli.parse([*flags, "--output-dir", str(tmp_path / "sub"), "--tasks", "1"]), wrist_only_policy, REMOVE,
                   tasks=TASKS, make_env=FakeEnv)
    assert [(row["task"], row["episodes"]) for row in sub["per_task"]] == [(1, 2)]


def test_evaluate_py_flags_keep_their_names_and_fill_evalconfig():
    """Every flag of the README, experiments/closed_loop/run.sh and the docs, by name; --tasks in the
    script's comma form and space-separated."""
    cli = _cli()
    args = cli.parse(["--checkpoint", "runs/B2/checkpoints/500", "--tasks", "0,1,2", "--n", "150", "--num-envs", "2",
                      "--output-dir", "out", "--eval-view", "real", "--suite", "libero_goal", "--max-steps", "9",
                      "--videos", "1", "--seed", "3", "--params", "params", "--policy-batch", "4",
                      "--assets-from-config", "--verbose"])
    episodes = EvalConfig(n=150, suite="libero_goal", output_dir=pathlib.Path("out"), num_envs=2, max_steps=9, videos=1,
                          seed=3, tasks=(0, 1, 2))
    assert args == cli.Args(checkpoint=pathlib.Path("runs/B2/checkpoints/500"), eval=episodes, params="params",
                            eval_view="real", policy_batch=4, assets_from_config=True, verbose=True)
    assert args.config() == episodes
    assert cli.parse(["--checkpoint", "c", "--tasks", "2", "0"]).eval.tasks == (2, 0)
    assert cli.parse(["--checkpoint", "c", "--tasks", "3"]).eval.tasks == (3,)
    default = cli.parse(["--checkpoint", "runs/B2/checkpoints/500"])
    assert default.eval == EvalConfig() and default.params == "ema" and default.eval_view == "deployed"
    assert default.config() == EvalConfig(output_dir=pathlib.Path("outputs/eval/B2_step500_libero_spatial"))
    assert cli.parse(["--checkpoint", "runs/B2", "--suite", "libero_10"]).config().output_dir == \
        pathlib.Path("outputs/eval/B2_libero_10")


@pytest.mark.parametrize("flags, message", [
    (["--tasks", "0;1"], "--tasks '0;1': expected task indices"),
    (["--tasks", "1,1"], "--tasks: expected distinct task indices >= 0, got (1, 1)"),
    (["--n", "0"], "--n 0: expected >= 1"),
    (["--num-envs", "0"], "--num-envs 0: expected >= 1"),
    (["--videos", "-1"], "--videos -1: expected >= 0"),
    (["--max-steps", "0"], "--max-steps 0: expected >= 1"),
])
def test_evaluate_py_refuses_a_bad_flag_at_start_naming_it_and_its_value(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _cli().parse(["--checkpoint", "c", *flags])
    assert exit_.value.code == 2
    assert message in " ".join(capsys.readouterr().err.replace("│", " ").split())  # tyro's box wraps long lines


def test_tasks_selects_a_subset_of_the_suite_and_n_is_spread_over_it(tmp_path):
    res = evaluate(_config(tmp_path, "sub", n=4, tasks=(2, 0)), wrist_only_policy, REMOVE, TASKS, FakeEnv)
    assert sorted({(t, e) for t, e, _, _ in _episodes(tmp_path / "sub")}) == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert [row["episodes"] for row in res["per_task"]] == [2, 2] and res["total"]["episodes"] == 4
    with pytest.raises(ValueError, match="identity|another evaluation"):  # the subset is part of the run's identity
        evaluate(_config(tmp_path, "sub", n=4, tasks=(1,)), wrist_only_policy, REMOVE, TASKS, FakeEnv)
    with pytest.raises(ValueError, match=r"--tasks 0,5: no task \[5\]"):
        evaluate(_config(tmp_path, "bad", tasks=(0, 5)), wrist_only_policy, REMOVE, TASKS, FakeEnv)
    with pytest.raises(ValueError, match="--tasks"):
        _config(tmp_path, "dup", tasks=(1, 1))


def test_a_resumed_run_removes_videos_of_episodes_without_a_record(tmp_path, caplog):
    """A run killed during an episode leaves a .partial.mp4, one killed between a video and its record
    leaves a finished video: on resume neither stays beside the records."""
    cfg = _config(tmp_path, "cut", n=3, videos=3)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, StopAfter(11), REMOVE, TASKS, FakeEnv)  # 4 audit calls, tasks 0 and 1, task 2 cut
    videos = cfg.output_dir / "videos"
    assert {(r.task, r.trial) for r in results.load_episodes(cfg.output_dir)} == {(0, 0), (1, 0)}
    assert [p.name for p in videos.glob("task02*")] == ["task02_trial00.partial.mp4"]
    orphan = videos / "task02_trial00_failure.mp4"  # as if killed after the video, before its record
    orphan.write_bytes(b"not a real video")
    with caplog.at_level(logging.INFO, logger="eqx_pi05"):
        evaluate(cfg, wrist_only_policy, REMOVE, TASKS, FakeEnv)
    assert "with no record" in caplog.text
    names = sorted(p.name for p in videos.iterdir())
    recorded = {(r.task, r.trial, "success" if r.success else "failure") for r in results.load_episodes(cfg.output_dir)}
    assert names == sorted(f"task{t:02d}_trial{e:02d}_{o}.mp4" for t, e, o in recorded)
    assert orphan.stat().st_size > len(b"not a real video")  # the rerun episode's own video


def test_n_below_the_task_count_says_it_evaluates_only_the_first_n_tasks(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="eqx_pi05"):
        res = evaluate(_config(tmp_path, "two", n=2, videos=0), wrist_only_policy, REMOVE, TASKS, FakeEnv)
    assert "n=2 is below the number of tasks (3): only the first 2 (tasks 0, 1) are evaluated" in caplog.text
    assert res["tasks_evaluated"] == 2 and res["per_task"][2]["text"] == "not run"
    assert "| 2 | " + TASKS[2].language + " | not run |" in (tmp_path / "two" / "results.md").read_text()


def test_chart_draws_a_task_with_no_episodes_as_not_run_and_keeps_its_legend_off_the_labels():
    rows = [{"task": i, "successes": s, "episodes": e, "success_rate": s / e if e else None}
            for i, (s, e) in enumerate([(50, 50), (45, 50), (3, 50), (0, 50), (1, 50), (0, 0), (0, 0)])]
    summary = {"per_task": rows, "total": {"success_rate": 99 / 250, "text": "39.6% (99/250)"}}
    fig = results.chart(summary, "B2 libero_spatial")
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts]
    assert [t.get_text() for t in labels] == ["50/50", "45/50", "3/50", "0/50", "1/50", "not run", "not run"]
    legend = ax.get_legend().get_window_extent(renderer)
    for text in labels:
        assert not legend.overlaps(text.get_window_extent(renderer)), text.get_text()


def _cli(monkeypatch=None):
    """evaluate.py as a module; with `monkeypatch`, its checkpoint checks pass and loading a model fails the test."""
    if monkeypatch is not None:
        from eqx_pi05 import preflight
        from eqx_pi05.eval import policy

        monkeypatch.setattr(preflight, "checkpoint_inputs", lambda *a, **k: [])
        monkeypatch.setattr(policy, "load_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cli  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(cli)
    return cli


def test_an_impossible_n_is_refused_before_the_model_loads_and_leaves_nothing_behind(tmp_path, monkeypatch):
    cli = _cli(monkeypatch)
    flags = ["--checkpoint", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "out"), "--max-steps", "5", "--videos", "0"]
    too_many = cli.parse([*flags, "--n", "100000"])
    with pytest.raises(ValueError, match=r"n=100000 over 3 tasks needs 33334 trials per task"):
        cli.main(too_many, tasks=TASKS, make_env=FakeEnv)
    assert not (tmp_path / "out").exists()
    ok = cli.parse([*flags, "--n", "2"])
    assert cli.main(ok, wrist_only_policy, REMOVE, tasks=TASKS, make_env=FakeEnv)["total"]["episodes"] == 2


def test_a_second_evaluation_of_a_directory_in_use_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from conftest import lock_held_by_another_process

    from eqx_pi05.lock import DirectoryInUse

    cli = _cli(monkeypatch)
    args = cli.parse(["--checkpoint", str(tmp_path / "ckpt"), "--n", "2", "--output-dir", str(tmp_path / "out"),
                      "--max-steps", "5", "--videos", "0"])
    with lock_held_by_another_process(tmp_path / "out", "evaluate.py B2") as holder:
        with pytest.raises(DirectoryInUse, match=rf"in use by evaluate.py B2 \(pid {holder.pid} on host"):
            cli.main(args, tasks=TASKS, make_env=FakeEnv)
        with pytest.raises(DirectoryInUse):  # and evaluate() itself, given a policy
            evaluate(_config(tmp_path, "out"), wrist_only_policy, REMOVE, TASKS, FakeEnv)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock"]  # the dead holder's, nothing else
    assert evaluate(_config(tmp_path, "out"), wrist_only_policy, REMOVE, TASKS, FakeEnv)["total"]["episodes"] == 7
