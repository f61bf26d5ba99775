import pathlib

import numpy as np
import pytest
import tyro

from eqx_pi05.data.data_config import DataConfig
from eqx_pi05.cameras import (
    CameraProbs,
    ViewDropoutConfig,
    ViewRemoveConfig,
    apply_view_dropout,
    apply_view_remove,
    draw,
)

PATHS = dict(dataset=pathlib.Path("d"), tokenizer=pathlib.Path("t"), norm_stats=pathlib.Path("n"))


def _inputs():
    rng = np.random.default_rng(0)
    image = {k: rng.integers(1, 255, (8, 8, 3), dtype=np.uint8) for k in ("base_0_rgb", "left_wrist_0_rgb")}
    image["right_wrist_0_rgb"] = np.zeros((8, 8, 3), np.uint8)
    mask = {"base_0_rgb": np.True_, "left_wrist_0_rgb": np.True_, "right_wrist_0_rgb": np.False_}
    return {"image": image, "image_mask": mask, "state": np.zeros(8, np.float32)}


def test_draw_depends_only_on_its_arguments_and_is_uniform():
    assert draw("view_remove", 3, 17, "agentview") == draw("view_remove", 3, 17, "agentview")
    values = np.array([draw("view_remove", 3, i, "agentview") for i in range(4000)])
    assert values.min() >= 0.0 and values.max() < 1.0
    assert abs(values.mean() - 0.5) < 0.02
    assert len(set(values.tolist())) == len(values)
    other_seed = np.array([draw("view_remove", 4, i, "agentview") for i in range(4000)])
    assert abs(np.corrcoef(values, other_seed)[0, 1]) < 0.05


def test_view_dropout_zeroes_pixels_and_keeps_the_mask_true():
    inputs = _inputs()
    out = apply_view_dropout(inputs, index=0, seed=0, probs=CameraProbs(agentview=1.0))
    assert not out["image"]["base_0_rgb"].any()
    assert out["image_mask"]["base_0_rgb"] == np.True_
    np.testing.assert_array_equal(out["image"]["left_wrist_0_rgb"], inputs["image"]["left_wrist_0_rgb"])
    assert out["image_mask"]["left_wrist_0_rgb"] == np.True_
    assert inputs["image"]["base_0_rgb"].any(), "the input sample must not be modified in place"


def test_view_remove_sets_the_mask_false_and_zeroes_pixels():
    inputs = _inputs()
    out = apply_view_remove(inputs, index=5, seed=0, probs=CameraProbs(wrist=1.0))
    assert out["image_mask"]["left_wrist_0_rgb"] == np.False_
    assert not out["image"]["left_wrist_0_rgb"].any()
    assert out["image_mask"]["base_0_rgb"] == np.True_
    np.testing.assert_array_equal(out["image"]["base_0_rgb"], inputs["image"]["base_0_rgb"])
    assert inputs["image_mask"]["left_wrist_0_rgb"] == np.True_


def test_zero_probability_leaves_the_sample_untouched():
    inputs = _inputs()
    assert apply_view_remove(inputs, 0, 0, CameraProbs()) is inputs
    assert apply_view_dropout(inputs, 0, 0, CameraProbs()) is inputs


def test_fraction_of_removed_samples_matches_the_probability_per_camera():
    probs = CameraProbs(agentview=0.3, wrist=0.6)
    outs = [apply_view_remove(_inputs(), i, 7, probs)["image_mask"] for i in range(2000)]
    agent = np.array([not m["base_0_rgb"] for m in outs])
    wrist = np.array([not m["left_wrist_0_rgb"] for m in outs])
    assert abs(agent.mean() - 0.3) < 0.04 and abs(wrist.mean() - 0.6) < 0.04
    assert abs((agent & wrist).mean() - 0.18) < 0.04, "cameras must be drawn independently"


def test_same_index_gets_the_same_draw_and_the_seed_changes_it():
    probs = CameraProbs(agentview=0.5)
    first = [bool(apply_view_remove(_inputs(), i, 1, probs)["image_mask"]["base_0_rgb"]) for i in range(200)]
    again = [bool(apply_view_remove(_inputs(), i, 1, probs)["image_mask"]["base_0_rgb"]) for i in range(200)]
    other = [bool(apply_view_remove(_inputs(), i, 2, probs)["image_mask"]["base_0_rgb"]) for i in range(200)]
    assert first == again
    assert first != other


def test_both_mechanisms_on_one_camera_raise_naming_both_fields():
    with pytest.raises(ValueError, match=r"view_dropout\.train\.agentview=1\.0.*view_remove\.train\.agentview=0\.0 / view_remove\.eval\.agentview=1\.0"):
        DataConfig(
            **PATHS,
            view_dropout=ViewDropoutConfig(train=CameraProbs(agentview=1.0)),
            view_remove=ViewRemoveConfig(eval=CameraProbs(agentview=1.0)),
        )


def test_mechanisms_on_different_cameras_are_allowed():
    cfg = DataConfig(
        **PATHS,
        view_dropout=ViewDropoutConfig(train=CameraProbs(wrist=0.5)),
        view_remove=ViewRemoveConfig(train=CameraProbs(agentview=1.0), eval=CameraProbs(agentview=1.0)),
    )
    assert cfg.view_remove.eval.agentview == 1.0


def test_probability_outside_unit_interval_raises():
    with pytest.raises(ValueError, match=r"wrist: expected a value in \[0, 1\], got 1.5"):
        CameraProbs(wrist=1.5)


def test_view_configs_parse_from_the_command_line():
    args = ["--dataset", "d", "--tokenizer", "t", "--norm-stats", "n", "--view-remove.seed", "42",
            "--view-remove.train.agentview", "1.0", "--view-remove.eval.agentview", "1.0"]
    cfg = tyro.cli(DataConfig, args=args)
    assert cfg.view_remove == ViewRemoveConfig(seed=42, train=CameraProbs(agentview=1.0), eval=CameraProbs(agentview=1.0))
    assert cfg.view_dropout == ViewDropoutConfig()
    with pytest.raises(SystemExit):  # tyro reports the construction error as a usage error
        tyro.cli(DataConfig, args=[*args, "--view-dropout.train.agentview", "0.5"])
