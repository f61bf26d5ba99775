"""The start-up check (eqx_pi05.preflight): every missing input listed at once with its path and the
command that gets it, exit status 2 and no traceback; remote inputs (gs:// weights, Hugging Face
dataset ids) through orbax and huggingface_hub, tested offline on local paths and a local hub cache."""

import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
from conftest import REPO

from eqx_pi05 import preflight
from eqx_pi05.data import hub
from eqx_pi05.variants import SUMMARIES, VARIANTS, demo, to_json

B5 = VARIANTS["curric_selfdistill"]


def run(args: list[str], cwd: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


def inputs(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every input of a real run, present (contents do not matter to the check, only what is where)."""
    paths = {"dataset": root / "libero", "norm_stats": root / "assets/norm_stats.json",
             "tokenizer": root / "assets/paligemma_tokenizer.model", "weights": root / "checkpoints/pi05_base/params"}
    (paths["dataset"] / "meta").mkdir(parents=True)
    (paths["dataset"] / "meta/info.json").write_text("{}")
    paths["norm_stats"].parent.mkdir(parents=True)
    paths["norm_stats"].write_text("{}")
    paths["tokenizer"].write_text("")
    paths["weights"].mkdir(parents=True)
    return paths


def config(paths: dict[str, pathlib.Path]):
    data = dataclasses.replace(B5.data, dataset=paths["dataset"], norm_stats=paths["norm_stats"], tokenizer=paths["tokenizer"])
    return dataclasses.replace(B5, data=data, weights=str(paths["weights"]))


def test_train_py_lists_all_four_missing_inputs_with_their_commands_and_exits_2_writing_nothing(tmp_path):
    done = run([str(REPO / "train.py"), "--variant", "curric_selfdistill"], cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    err = done.stderr
    assert "4 input(s) missing" in err
    for expected, command in (
        ("data/physical-intelligence/libero", "hf download physical-intelligence/libero --repo-type dataset --local-dir data/physical-intelligence/libero"),
        ("assets/pi05_libero_spatial/norm_stats.json", "python -m eqx_pi05.data.norm_stats data/physical-intelligence/libero --suites libero_spatial --output assets/pi05_libero_spatial/norm_stats.json"),
        ("assets/paligemma_tokenizer.model", "gsutil cp gs://big_vision/paligemma_tokenizer.model assets/paligemma_tokenizer.model"),
        ("checkpoints/pi05_base/params", "gsutil -m cp -r gs://openpi-assets/checkpoints/pi05_base checkpoints/"),
    ):
        assert f"expected: {expected}" in err and command in err, (expected, err)
    assert "--preset demo" in err
    assert list(tmp_path.iterdir()) == []  # no outputs/ directory, nothing else


@pytest.mark.parametrize("name", ["dataset", "norm_stats", "tokenizer", "weights"])
def test_each_missing_input_is_named_alone_with_its_path(tmp_path, name):
    paths = inputs(tmp_path)
    cfg = config(paths)
    _, missing = preflight.train_inputs(cfg)
    assert missing == []
    target = paths[name]
    if name == "weights":
        target.rmdir()
    elif name == "dataset":  # a directory without meta/info.json is not a LeRobot dataset
        (target / "meta/info.json").unlink()
    else:
        target.unlink()
    _, missing = preflight.train_inputs(cfg)
    assert len(missing) == 1, missing
    assert str(target) in missing[0].expected and missing[0].fix


def test_a_resumed_run_does_not_need_its_start_weights(tmp_path):
    paths = inputs(tmp_path)
    paths["weights"].rmdir()
    cfg = dataclasses.replace(config(paths), output_dir=tmp_path / "run", resume=True)
    assert [m.what for m in preflight.train_inputs(cfg)[1]] == ["weights (--weights)"]
    (tmp_path / "run/checkpoints/100").mkdir(parents=True)
    assert preflight.train_inputs(cfg)[1] == []


def test_gs_weights_stay_a_url_from_the_cli_to_orbax():
    import train as train_cli

    url = "gs://openpi-assets/checkpoints/pi05_base/params"
    cfg = train_cli.parse(["--variant", "pi05_libero", "--weights", url])
    assert cfg.weights == url  # a pathlib.Path would have folded it into gs:/openpi-assets/...
    assert preflight.is_remote(cfg.weights)
    if importlib.util.find_spec("gcsfs") is None:  # without gcsfs nothing here can reach the network
        from eqx_pi05.convert.openpi import read_checkpoint

        # The URL reached orbax's path layer (etils.epath -> fsspec's gs backend), not the local filesystem.
        with pytest.raises(ImportError, match="gcsfs"):
            read_checkpoint(url)


def test_gs_weights_without_a_gs_reader_installed_are_named_with_the_install_command(tmp_path, monkeypatch):
    paths = inputs(tmp_path)
    cfg = dataclasses.replace(config(paths), weights="gs://openpi-assets/checkpoints/pi05_base/params")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("gcsfs", "tensorflow") else real(name, *a))
    [m] = preflight.train_inputs(cfg)[1]
    assert "gcsfs" in m.expected and m.fix.startswith("pip install gcsfs")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "gcsfs" else real(name, *a))
    assert preflight.train_inputs(cfg)[1] == []  # checked when orbax opens it: no offline way to look


def hub_cache(root: pathlib.Path, repo_id: str, files: dict[str, bytes]) -> pathlib.Path:
    """A Hugging Face hub cache holding one snapshot of dataset `repo_id`, laid out as huggingface_hub writes it."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # an id is a hub id only where no local directory of that name exists
    return tmp_path / "hub"


def test_a_hub_dataset_id_resolves_to_its_cached_snapshot_offline(tmp_path, offline_hub):
    snapshot = hub_cache(offline_hub, "physical-intelligence/libero", {"meta/info.json": b"{}"})
    paths = inputs(tmp_path / "local")
    cfg = dataclasses.replace(config(paths), data=dataclasses.replace(config(paths).data, dataset=pathlib.Path("physical-intelligence/libero")))
    resolved, missing = preflight.train_inputs(cfg)
    assert missing == [] and resolved.data.dataset == snapshot
    assert hub.resolve("physical-intelligence/libero") == snapshot
    assert hub.resolve(paths["dataset"]) == paths["dataset"]  # a local directory is never a hub id


def test_a_hub_dataset_id_not_in_the_cache_offline_is_named_with_the_download_command(tmp_path, offline_hub):
    paths = inputs(tmp_path / "local")
    paths["tokenizer"].unlink()
    cfg = dataclasses.replace(config(paths), data=dataclasses.replace(config(paths).data, dataset=pathlib.Path("someone/other-data")))
    missing = preflight.train_inputs(cfg)[1]  # listed with the other missing input, not raised on its own
    assert [m.what.split()[0] for m in missing] == ["dataset", "tokenizer"]
    assert "someone/other-data" in missing[0].expected and "HF_HUB_OFFLINE" in missing[0].expected
    assert missing[0].fix.startswith("hf download someone/other-data --repo-type dataset")
    with pytest.raises(FileNotFoundError, match="someone/other-data"):
        hub.resolve("someone/other-data")


def test_norm_stats_of_a_hub_dataset_id_from_the_offline_cache_given_by_environment(tmp_path):
    """The norm-stats command on `owner/name` reads the snapshot in HF_HUB_CACHE with HF_HUB_OFFLINE=1."""
    from eqx_pi05.data import norm_stats
    from eqx_pi05.data.make_demo_dataset import make_demo_dataset

    local = tmp_path / "demo"
    make_demo_dataset(local)
    norm_stats.main(local, output=tmp_path / "local_stats.json")
    files = {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    hub_cache(tmp_path / "hub", "someone/demo", files)
    out = tmp_path / "stats.json"
    done = run(["-m", "eqx_pi05.data.norm_stats", "someone/demo", "--output", str(out)], cwd=tmp_path,
               HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == json.loads((tmp_path / "local_stats.json").read_text())


def fake_checkpoint(run_dir: pathlib.Path, cfg) -> pathlib.Path:
    """A step directory with the config item train.py writes (the params are not read by the check)."""
    import orbax.checkpoint as ocp

    step = run_dir / "checkpoints" / "5"
    (step / "params").mkdir(parents=True)
    (step / "config").mkdir()
    ocp.JsonCheckpointHandler().save(step / "config", args=ocp.args.JsonSave(to_json(cfg)))
    return step


def test_evaluate_and_serve_name_the_missing_checkpoint_and_exit_2(tmp_path):
    for args in (["evaluate.py", "--checkpoint", "nowhere", "--n", "1"], ["-m", "eqx_pi05.serve", "--checkpoint", "nowhere"]):
        done = run([str(REPO / args[0]) if args[0].endswith(".py") else args[0], *args[1:]], cwd=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "checkpoint (--checkpoint)" in done.stderr and str(tmp_path / "nowhere") in done.stderr
        assert "python train.py --variant NAME" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_old_checkpoint_without_assets_whose_tokenizer_and_norm_stats_moved_is_named_with_both(tmp_path):
    paths = inputs(tmp_path)
    step = fake_checkpoint(tmp_path / "run", demo(B5, paths["dataset"]))  # names dataset/tokenizer.model, dataset/norm_stats.json
    (missing,) = preflight.checkpoint_inputs(tmp_path / "run")  # no assets item: the flag is the way out
    assert missing.what == "norm stats and tokenizer in the checkpoint" and "--assets-from-config" in missing.fix
    missing = preflight.checkpoint_inputs(tmp_path / "run", assets_from_config=True)
    assert sorted(m.what.split(" (")[0] for m in missing) == ["norm stats", "tokenizer"]
    assert {str(paths["dataset"] / "tokenizer.model"), str(paths["dataset"] / "norm_stats.json")} == {m.expected.split(":")[0] for m in missing}
    (step / "assets").mkdir()  # a checkpoint that stores them does not need the config's files
    assert preflight.checkpoint_inputs(tmp_path / "run") == []


def test_evaluation_names_a_missing_simulator_extra_and_an_unusable_mujoco_gl(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libero" else real(name, *a))
    monkeypatch.setenv("MUJOCO_GL", "wgl")
    missing = preflight.simulator_inputs()
    assert [m.what for m in missing] == ["LIBERO simulator (the libero extra)", "MUJOCO_GL"]
    assert "['libero']" in missing[0].expected and missing[0].fix == 'pip install -e ".[libero]"'
    assert "wgl" in missing[1].expected and "MUJOCO_GL=egl" in missing[1].fix
    monkeypatch.setenv("MUJOCO_GL", "glfw")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.setattr(preflight.ctypes.util, "find_library", lambda name: f"lib{name}.so")
    assert "DISPLAY" in preflight.simulator_inputs()[1].expected


def test_train_py_help_lists_every_variant_with_its_summary_and_common_flags_that_exist():
    import train as train_cli

    overview = run([str(REPO / "train.py"), "--help"], cwd=REPO, COLUMNS="200")
    assert overview.returncode == 0
    # tyro's subcommand box: "│   • NAME" then "│       SUMMARY"; the common flags above it, one a line.
    lines = [" ".join(line.strip("│ ").removeprefix("• ").split()) for line in overview.stdout.splitlines()]
    for name, summary in SUMMARIES.items():
        assert lines.count(name) == 1 and lines[lines.index(name) + 1] == summary, name
        for preset in ("demo", "closed_loop"):
            entry = f"{name}_{preset}"
            assert lines.count(entry) == 1 and lines[lines.index(entry) + 1] == f"--variant {name} --preset {preset}"
    for flag, text in train_cli.COMMON_FLAGS:
        assert f"{flag} {text}" in lines, flag
    full = run([str(REPO / "train.py"), "--variant", "pi05_libero", "--help"], cwd=REPO).stdout
    for flag, _ in train_cli.COMMON_FLAGS:
        assert flag.split()[0] in full or flag.split()[0] in ("--preset", "--verbose"), flag
