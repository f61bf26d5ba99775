"""openpi checkpoint layouts ⇄ our model: every leaf, both directions, loud errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from eqx_pi05.convert import openpi


def test_released_and_trainer_checkpoint_layouts_load_identically(fixture_dir):
    ref = dict(np.load(fixture_dir / "params.npz"))
    for ckpt in (fixture_dir / "params", fixture_dir / "train_ckpt" / "1000" / "params"):
        flat = openpi.read_checkpoint(ckpt)
        assert sorted(flat) == sorted(ref), ckpt
        for k in ref:
            np.testing.assert_array_equal(flat[k], ref[k], err_msg=k)


def test_every_openpi_leaf_is_mapped_both_ways(golden, fixture_dir):
    model, _, config = golden
    ref = dict(np.load(fixture_dir / "params.npz"))
    ours = openpi.to_openpi(model)
    assert sorted(ours) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(np.asarray(ours[k]), ref[k], err_msg=k)


def test_checkpoint_round_trip_is_bit_exact(golden, tmp_path):
    model, _, config = golden
    openpi.save_checkpoint(model, tmp_path / "params")
    back = openpi.read_checkpoint(tmp_path / "params")
    src = openpi.to_openpi(model)
    assert sorted(back) == sorted(src)
    for k, v in src.items():
        np.testing.assert_array_equal(back[k], np.asarray(v), err_msg=k)
    again = openpi.to_openpi(openpi.load_checkpoint(tmp_path / "params", config))
    for k, v in src.items():
        np.testing.assert_array_equal(np.asarray(again[k]), np.asarray(v), err_msg=k)


def test_shape_mismatch_names_path_and_both_shapes(golden):
    _, _, config = golden
    flat = {k: np.asarray(v) for k, v in openpi.to_openpi(golden[0]).items()}
    flat["PaliGemma/llm/layers/attn/q_einsum/w"] = np.zeros((4, 8, 32, 16), np.float32)
    with pytest.raises(ValueError, match=r"PaliGemma/llm/layers/attn/q_einsum/w: expected \(4, 8, 64, 16\), got \(4, 8, 32, 16\)"):
        openpi.from_openpi(flat, config)


def test_missing_and_extra_leaves_are_errors(golden):
    _, _, config = golden
    flat = {k: np.asarray(v) for k, v in openpi.to_openpi(golden[0]).items()}
    del flat["time_mlp_in/bias"]
    flat["state_proj/kernel"] = np.zeros((32, 64), np.float32)
    with pytest.raises(ValueError) as err:
        openpi.from_openpi(flat, config)
    assert "time_mlp_in/bias: missing (expected (64,))" in str(err.value)
    assert "state_proj/kernel: not in the model (shape (32, 64))" in str(err.value)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        openpi.read_checkpoint(tmp_path / "nope")


def _listing():
    from conftest import SHARED_FIXTURES, REPO

    for p in (SHARED_FIXTURES / "openpi_pi05_full_param_shapes.json", REPO / "tests" / "fixtures" / "openpi_pi05_full_param_shapes.json"):
        if p.exists():
            return p
    pytest.skip("openpi_pi05_full_param_shapes.json not found (shared/fixtures absent)")


def test_check_shapes_cli_matches_the_full_size_reference_tree():
    out = subprocess.run([sys.executable, "-m", "eqx_pi05.convert.openpi", "--check-shapes", str(_listing())], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "51/51 leaves match" in out.stdout
    assert "3,353,433,872 parameters" in out.stdout


def test_check_shapes_cli_fails_on_a_different_tree(tmp_path):
    listing = json.loads(_listing().read_text())
    listing["params"]["PaliGemma/llm/layers/mlp_1/linear"]["shape"] = [18, 4096, 2048]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(listing))
    out = subprocess.run([sys.executable, "-m", "eqx_pi05.convert.openpi", "--check-shapes", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0
    assert "MISMATCH PaliGemma/llm/layers/mlp_1/linear: ours (18, 4096, 1024), reference (18, 4096, 2048)" in out.stdout
    assert "50/51 leaves match" in out.stdout
