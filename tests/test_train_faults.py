"""Fault tests of train.py (issue 13): a run is never lost, and a bad input is named before anything
in the output directory changes.

A failed start leaves the directory byte for byte as it was; a second writer is refused naming the
holder; a truncated or bit-flipped checkpoint is reported by step and the run falls back to the
newest intact one; a state with NaN is never saved; a finite dataset ends the run cleanly; and
metrics.jsonl holds one record per step after a kill and a resume. SLOW (marked): one shared
compile of the small demo step (~1 min on two contended cores), a few seconds per run after it;
the kill test starts train.py twice.
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, lock_held_by_another_process, small_run

from eqx_pi05 import checkpoints, lock
from eqx_pi05.data import norm_stats
from eqx_pi05.train.loop import train
from eqx_pi05.train.metrics import MetricsLog, read

pytestmark = pytest.mark.slow

VARIANT = "pi05_libero"


def snapshot(directory: pathlib.Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes (and every directory, as b"<dir>")."""
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(directory.rglob("*"))}


@pytest.fixture(scope="module")
def finished(demo_data, tmp_path_factory):
    """A finished 4-step run with checkpoints 2 and 4: (config, records)."""
    cfg = small_run(VARIANT, demo_data, tmp_path_factory.mktemp("finished") / "run", num_train_steps=4)
    return cfg, train(cfg)


def copy_run(finished, tmp_path, **changes):
    cfg, records = finished
    shutil.copytree(cfg.run_dir, tmp_path / "run")
    return dataclasses.replace(cfg, output_dir=tmp_path / "run", **changes), records


def broken_dataset(demo_data, tmp_path, edit) -> pathlib.Path:
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    edit(data)
    return data


def drop_wrist_feature(data: pathlib.Path) -> None:
    info = json.loads((data / "meta" / "info.json").read_text())
    del info["features"]["wrist_image"]
    (data / "meta" / "info.json").write_text(json.dumps(info))


def nan_norm_stats(data: pathlib.Path) -> None:
    stats = json.loads((data / "norm_stats.json").read_text())
    stats["norm_stats"]["state"]["q99"][3] = float("nan")
    (data / "norm_stats.json").write_text(json.dumps(stats))


def truncate_parquet(data: pathlib.Path) -> None:
    path = data / "data" / "chunk-000" / "episode_000003.parquet"
    path.write_bytes(path.read_bytes()[:500])


@pytest.mark.parametrize("edit, error", [
    (drop_wrist_feature, r"info.json: feature 'wrist_image' \(for .*\) missing"),
    (nan_norm_stats, r"norm_stats.json: state.q99\[3\] is nan: expected finite numbers"),
    (truncate_parquet, r"episode_000003.parquet: not a readable parquet file"),
])
@pytest.mark.parametrize("mode", ["overwrite", "resume"])
def test_a_failed_start_leaves_the_output_directory_byte_for_byte_as_it_was(finished, demo_data, tmp_path, edit, error, mode):
    data = broken_dataset(demo_data, tmp_path, edit)
    cfg, _ = copy_run(finished, tmp_path, **{mode: True})
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=data, norm_stats=data / "norm_stats.json"))
    before = snapshot(cfg.run_dir)
    with pytest.raises(ValueError, match=error):
        train(cfg)
    assert snapshot(cfg.run_dir) == before


def test_weights_of_the_wrong_shape_fail_before_the_directory_changes(finished, tmp_path):
    from conftest import random_model
    from eqx_pi05.convert import openpi

    cfg, _ = copy_run(finished, tmp_path, overwrite=True)
    other = dataclasses.replace(cfg.model, action_expert=dataclasses.replace(cfg.model.action_expert, width=cfg.model.action_expert.width * 2))
    openpi.save_checkpoint(random_model(other), tmp_path / "weights")
    before = snapshot(cfg.run_dir)
    with pytest.raises(ValueError, match=r"checkpoint param .*: expected"):
        train(dataclasses.replace(cfg, weights=str(tmp_path / "weights")))
    assert snapshot(cfg.run_dir) == before


def test_resume_of_a_directory_without_checkpoints_is_an_error_and_creates_nothing(demo_data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--resume: no checkpoint in .*new.checkpoints"):
        train(small_run(VARIANT, demo_data, tmp_path / "new", resume=True))
    assert not (tmp_path / "new").exists()


def test_a_second_writer_is_refused_naming_pid_and_host_and_a_dead_ones_lock_is_taken_over(finished, tmp_path, caplog):
    cfg, records = copy_run(finished, tmp_path, overwrite=True)
    with lock_held_by_another_process(cfg.run_dir) as holder:
        before = snapshot(cfg.run_dir)
        with pytest.raises(lock.DirectoryInUse, match=rf"in use by train.py other \(pid {holder.pid} on host {os.uname().nodename}\)"):
            train(cfg)
        assert snapshot(cfg.run_dir) == before
    # The holder died without releasing: its lock is taken over, with a warning naming it.
    assert json.loads((cfg.run_dir / ".lock").read_text())["pid"] == holder.pid
    again = train(cfg)
    assert [r["loss"] for r in again] == [r["loss"] for r in records]  # overwrite: the same run again
    assert f"taking over the lock of pid {holder.pid}" in caplog.text
    assert not (cfg.run_dir / ".lock").exists()


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bytes(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 100):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [flip_bytes, truncate])
@pytest.mark.parametrize("item", ["params", "train"])
def test_a_damaged_latest_checkpoint_is_reported_by_step_and_the_run_resumes_from_the_previous(finished, tmp_path, caplog, damage, item):
    cfg, records = copy_run(finished, tmp_path, resume=True, num_train_steps=5)
    damage(_largest_file(cfg.run_dir / "checkpoints" / "4" / item))
    resumed = train(cfg)
    assert "checkpoint step 4" in caplog.text and "is corrupt" in caplog.text
    # Steps 2 and 3 again, bit for bit as the first time, then step 4.
    assert [r["loss"] for r in resumed[:2]] == [r["loss"] for r in records[2:]]
    assert [r["step"] for r in resumed] == [2, 3, 4]
    assert [r["step"] for r in read(cfg.run_dir / "metrics.jsonl")] == [0, 1, 2, 3, 4]  # one record per step
    assert (cfg.run_dir / "checkpoints" / "corrupt-4").is_dir()  # set aside, not deleted
    assert checkpoints.manager(cfg.run_dir / "checkpoints").all_steps() == [4, 5]


def test_a_damaged_config_of_the_latest_checkpoint_is_skipped_when_resuming(finished, tmp_path, caplog):
    cfg, records = copy_run(finished, tmp_path, resume=True, num_train_steps=5)
    for f in (cfg.run_dir / "checkpoints" / "4" / "config").rglob("*"):
        if f.is_file():
            f.write_text("{not json")
    resumed = train(cfg)
    assert "checkpoint config unreadable" in caplog.text and "checkpoints/4/config" in caplog.text
    assert [r["step"] for r in resumed] == [4]  # its arrays are intact: the run goes on from step 4


def test_no_intact_checkpoint_is_an_error_naming_every_step(finished, tmp_path):
    cfg, _ = copy_run(finished, tmp_path, resume=True, num_train_steps=5)
    for step in (2, 4):
        flip_bytes(_largest_file(cfg.run_dir / "checkpoints" / str(step) / "params"))
    before = snapshot(cfg.run_dir)
    with pytest.raises(checkpoints.CorruptCheckpoint, match=r"no intact checkpoint .* step 4: .* step 2: "):
        train(cfg)
    assert snapshot(cfg.run_dir) == before


def test_evaluation_loading_detects_an_altered_checkpoint(finished, tmp_path):
    cfg, _ = copy_run(finished, tmp_path)
    flip_bytes(_largest_file(cfg.run_dir / "checkpoints" / "4" / "params"))
    with pytest.raises(checkpoints.CorruptCheckpoint, match=r"checkpoints/4: params"):
        checkpoints.load_trained(cfg.run_dir, params="params")


def test_a_state_with_nan_is_never_saved(tmp_path):
    @dataclasses.dataclass
    class State:  # the fields checkpoints.save reads
        step: jax.Array
        params: dict
        opt_state: dict
        rng: jax.Array
        ema: dict | None = None

        def model(self):
            return self.params

    mgr = checkpoints.manager(tmp_path / "checkpoints", async_save=False)
    bad = State(jnp.int32(7), {"w": jnp.array([1.0, jnp.nan])}, {}, jnp.zeros(2, jnp.uint32))
    with pytest.raises(FloatingPointError, match=r"params hold non-finite values at step 7 \(\['w'\]\): not saved; no checkpoint was saved yet"):
        checkpoints.save(mgr, bad, None, small_run(VARIANT, tmp_path, tmp_path))
    assert mgr.all_steps() == []


def test_a_finite_dataset_ends_the_run_cleanly_with_a_final_checkpoint(demo_data, tmp_path, caplog):
    def two_episodes(data):
        for f in sorted((data / "data" / "chunk-000").glob("*.parquet"))[2:]:
            f.unlink()
        lines = (data / "meta" / "episodes.jsonl").read_text().splitlines()[:2]
        (data / "meta" / "episodes.jsonl").write_text("\n".join(lines) + "\n")
        norm_stats.main(data)  # the stats of these episodes (training refuses another selection's)

    data = broken_dataset(demo_data, tmp_path, two_episodes)
    frames = sum(json.loads(line)["length"] for line in (data / "meta" / "episodes.jsonl").read_text().splitlines())
    cfg = small_run(VARIANT, demo_data, tmp_path / "run", num_train_steps=100, log_interval=5, save_interval=50)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=data, norm_stats=data / "norm_stats.json", num_epochs=1))
    records = train(cfg)
    batches = frames // cfg.data.batch_size
    assert f"the data ran out after data.num_epochs=1 epoch(s) at step {batches} of num_train_steps=100" in caplog.text
    assert records[-1]["step"] == batches - 1 and all(np.isfinite(r["loss"]) for r in records)
    assert checkpoints.manager(cfg.run_dir / "checkpoints").latest_step() == batches


def test_metrics_log_of_a_resumed_run_drops_the_records_the_resumed_run_writes_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(6)) + '{"step": 6, "lo')
    MetricsLog(path, start=4).write(4, {"loss": 40.0})
    assert read(path) == [{"step": s, "loss": float(s)} for s in range(4)] + [{"step": 4, "loss": 40.0}]


def test_kill_9_during_a_checkpoint_save_then_resume_gives_the_uninterrupted_run(demo_data, tmp_path):
    """train.py killed while orbax writes a checkpoint (its temporary directory exists), then resumed:
    the parameters and the losses are those of a run that was never interrupted."""
    n = 8
    straight_cfg = small_run(VARIANT, demo_data, tmp_path / "straight", num_train_steps=n, save_interval=1)
    straight = train(straight_cfg)
    flags = ["--variant", VARIANT, "--preset", "demo", "--output-dir", str(tmp_path / "killed"), "--num-train-steps", str(n),
             "--save-interval", "1", "--log-interval", "1", "--keep-checkpoints", "2", "--xla-fast-compile",
             "--data.dataset", str(demo_data), "--data.tokenizer", str(demo_data / "tokenizer.model"),
             "--data.norm-stats", str(demo_data / "norm_stats.json"), "--data.batch-size", "4", "--data.max-token-len", "24",
             "--model.max-token-len", "24", "--model.paligemma.depth", "1", "--model.action-expert.depth", "1",
             "--model.siglip.depth", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts, killed_at = tmp_path / "killed" / "checkpoints", None
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        tmp = [p.name for p in ckpts.glob("*.orbax-checkpoint-tmp*")] if ckpts.is_dir() else []
        if tmp and not tmp[0].startswith("1."):
            proc.send_signal(signal.SIGKILL)
            killed_at = tmp[0]
            break
        time.sleep(0.002)
    proc.wait()
    assert killed_at is not None, f"train.py finished before a save could be interrupted: {proc.stderr.read()[-2000:]}"
    proc.stderr.close()
    resumed = subprocess.run([sys.executable, "train.py", *flags, "--resume"], cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logged = read(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(n))  # one record per step
    assert [r["loss"] for r in logged] == [r["loss"] for r in straight]
    a, b = (checkpoints.load_trained(d, params="params")[0] for d in (straight_cfg.run_dir, tmp_path / "killed"))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_train_py_names_a_damaged_dataset_file_without_a_traceback_and_writes_nothing(demo_data, tmp_path):
    data = broken_dataset(demo_data, tmp_path, truncate_parquet)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "train.py", "--variant", VARIANT, "--preset", "demo", "--output-dir", str(out),
                           "--data.dataset", str(data), "--data.tokenizer", str(data / "tokenizer.model"),
                           "--data.norm-stats", str(data / "norm_stats.json")],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert re.search(r"train.py: .*episode_000003.parquet: not a readable parquet file", done.stderr), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not out.exists()
