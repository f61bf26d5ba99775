import pathlib

import numpy as np
import PIL.Image
import pytest

from eqx_pi05.data.data_config import DataConfig
from eqx_pi05.data.images import decode_image, resize_with_pad, to_uint8_hwc
from eqx_pi05.data.lerobot_write import encode_png
from eqx_pi05.data.make_demo_dataset import EXTRA_TEXT, LIBERO_SPATIAL_TASKS
from eqx_pi05.data.norm_stats import NormStats
from eqx_pi05.data.tokenizer import Tokenizer, train_sentencepiece
from eqx_pi05.data.transforms import (
    libero_inputs,
    libero_outputs,
    make_transforms,
    normalize,
    pad_state_actions,
    resize_images,
    stack,
    tokenize,
)
from eqx_pi05.cameras import CameraProbs, ViewDropoutConfig, ViewRemoveConfig

H = 10


def _stats(dim, lo, hi):
    lo, hi = np.full(dim, lo, np.float64), np.full(dim, hi, np.float64)
    return NormStats(mean=(lo + hi) / 2, std=np.ones(dim), q01=lo, q99=hi)


STATS = {"state": _stats(8, -1.0, 3.0), "actions": _stats(7, 0.0, 2.0)}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = train_sentencepiece([*LIBERO_SPATIAL_TASKS, EXTRA_TEXT], tmp_path_factory.mktemp("tok") / "tokenizer.model")
    return Tokenizer(path, 48)


def _sample(size=256, actions=True):
    rng = np.random.default_rng(0)
    sample = {
        "observation/image": rng.integers(1, 256, (size, size, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(1, 256, (size, size, 3), dtype=np.uint8),
        "observation/state": np.linspace(-1, 3, 8).astype(np.float32),
        "prompt": LIBERO_SPATIAL_TASKS[0],
    }
    if actions:
        sample["actions"] = np.tile(np.linspace(0, 2, 7, dtype=np.float32), (H, 1))
    return sample


def _cfg(**kw):
    return DataConfig(dataset=pathlib.Path("d"), tokenizer=pathlib.Path("t"), norm_stats=pathlib.Path("n"), max_token_len=48, **kw)


def test_libero_inputs_maps_cameras_to_slots_and_pads_the_right_wrist():
    sample = _sample()
    out = libero_inputs(sample)
    assert list(out["image"]) == ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
    assert out["image"]["base_0_rgb"] is sample["observation/image"]
    assert out["image"]["left_wrist_0_rgb"] is sample["observation/wrist_image"]
    assert out["image"]["right_wrist_0_rgb"].shape == (256, 256, 3) and not out["image"]["right_wrist_0_rgb"].any()
    assert out["image_mask"] == {"base_0_rgb": True, "left_wrist_0_rgb": True, "right_wrist_0_rgb": False}
    np.testing.assert_array_equal(out["state"], sample["observation/state"])
    assert out["prompt"] == sample["prompt"]


def test_libero_inputs_accepts_float_chw_images_like_openpi():
    chw = np.full((3, 4, 5), 0.5, np.float32)
    image = to_uint8_hwc(chw)
    assert image.shape == (4, 5, 3) and (image == 127).all()  # 255 * 0.5 truncates to 127
    with pytest.raises(KeyError, match="observation/wrist_image"):
        libero_inputs({"observation/image": image, "observation/state": np.zeros(8)})


def test_quantile_normalization_maps_q01_q99_to_minus_one_one_without_clipping():
    data = {"state": np.array([-1.0, 1.0, 3.0, 7.0, 0, 0, 0, 0], np.float32), "actions": np.array([[0.0, 1.0, 2.0, 4.0, 0, 0, 0]], np.float32)}
    out = normalize(data, STATS)
    np.testing.assert_allclose(out["state"][:4], [-1.0, 0.0, 1.0, 3.0], atol=1e-5)
    np.testing.assert_allclose(out["actions"][0, :4], [-1.0, 0.0, 1.0, 3.0], atol=1e-5)
    assert out["state"].dtype == np.float32


def test_libero_outputs_inverts_normalization_and_keeps_seven_dims():
    actions = np.random.default_rng(1).uniform(0, 2, (2, H, 7)).astype(np.float32)
    padded = pad_state_actions({"state": np.zeros(8, np.float32), "actions": normalize({"state": np.zeros(8), "actions": actions}, STATS)["actions"]})["actions"]
    assert padded.shape == (2, H, 32)
    restored = libero_outputs(padded, STATS)
    assert restored.shape == (2, H, 7)
    np.testing.assert_allclose(restored, actions, atol=1e-5)


def test_resize_with_pad_matches_pil_bilinear_and_centres_non_square_images():
    image = np.random.default_rng(2).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    expected = np.asarray(PIL.Image.fromarray(image).resize((224, 224), resample=PIL.Image.BILINEAR))
    np.testing.assert_array_equal(resize_with_pad(image, 224, 224), expected)
    wide = np.full((100, 200, 3), 200, np.uint8)
    out = resize_with_pad(wide, 224, 224)
    assert (out[:56] == 0).all() and (out[168:] == 0).all()
    assert (out[56:168] == 200).all()
    at_size = np.ones((224, 224, 3), np.uint8)
    assert resize_with_pad(at_size, 224, 224) is at_size
    assert resize_images({"image": {"a": image}})["image"]["a"].shape == (224, 224, 3)


def test_decode_image_roundtrips_png_and_reports_garbage():
    image = np.random.default_rng(3).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_png(image)), image)
    with pytest.raises(ValueError, match=r"undecodable image \(5 bytes\)"):
        decode_image(b"\x89PNGx")


def test_tokenize_replaces_the_prompt_and_reads_the_state_only_in_discrete_mode(tokenizer):
    data = {"state": np.array([0.0, 0.5]), "prompt": "pick up the plate"}
    plain = tokenize(data, tokenizer, discrete_state_input=False)
    assert "prompt" not in plain
    np.testing.assert_array_equal(plain["tokenized_prompt"], tokenizer.tokenize("pick up the plate")[0])
    discrete = tokenize(data, tokenizer, discrete_state_input=True)
    np.testing.assert_array_equal(discrete["tokenized_prompt"], tokenizer.tokenize("pick up the plate", np.array([0.0, 0.5]))[0])
    with pytest.raises(ValueError, match="no prompt"):
        tokenize({"state": np.zeros(2), "prompt": None}, tokenizer, False)


def test_padding_appends_zeros_to_thirty_two_dims():
    out = pad_state_actions({"state": np.arange(8, dtype=np.float32) + 1, "actions": np.ones((H, 7), np.float32)})
    np.testing.assert_array_equal(out["state"], np.r_[np.arange(8) + 1, np.zeros(24)])
    np.testing.assert_array_equal(out["actions"][:, :7], 1.0)
    assert not out["actions"][:, 7:].any() and out["actions"].shape == (H, 32)
    with pytest.raises(ValueError, match=r"at most 32 values.*\(33,\)"):
        pad_state_actions({"state": np.zeros(33, np.float32)})


def test_full_chain_produces_the_model_dict_with_values(tokenizer):
    sample = _sample()
    out = make_transforms(_cfg(), STATS, tokenizer, train=True)(sample, index=0)
    assert sorted(out) == ["actions", "image", "image_mask", "state", "tokenized_prompt", "tokenized_prompt_mask"]
    assert {k: v.shape for k, v in out["image"].items()} == {k: (224, 224, 3) for k in out["image"]}
    assert all(v.dtype == np.uint8 for v in out["image"].values())
    np.testing.assert_array_equal(out["image"]["base_0_rgb"], resize_with_pad(sample["observation/image"], 224, 224))
    np.testing.assert_allclose(out["state"][:8], np.linspace(-1, 1, 8), atol=1e-5)  # state spans q01..q99
    assert not out["state"][8:].any() and out["state"].dtype == np.float32
    np.testing.assert_allclose(out["actions"][:, :7], np.tile(np.linspace(-1, 1, 7), (H, 1)), atol=1e-5)
    assert out["actions"].shape == (H, 32) and not out["actions"][:, 7:].any()
    np.testing.assert_array_equal(out["tokenized_prompt"], tokenizer.tokenize(LIBERO_SPATIAL_TASKS[0])[0])
    assert out["tokenized_prompt"].dtype == np.int32 and out["tokenized_prompt_mask"].dtype == np.bool_


def test_policy_chain_takes_224_images_without_actions_and_applies_eval_removal_only(tokenizer):
    cfg = _cfg(
        view_dropout=ViewDropoutConfig(train=CameraProbs(wrist=1.0)),
        view_remove=ViewRemoveConfig(train=CameraProbs(agentview=1.0), eval=CameraProbs(agentview=1.0)),
    )
    sample = _sample(size=224, actions=False)
    out = make_transforms(cfg, STATS, tokenizer, train=False, eval_view="real")(sample, index=3)
    assert "actions" not in out
    assert out["image_mask"]["base_0_rgb"] == False and not out["image"]["base_0_rgb"].any()  # noqa: E712
    np.testing.assert_array_equal(out["image"]["left_wrist_0_rgb"], sample["observation/wrist_image"])  # no dropout at eval
    # The default eval view is what a robot without the dropped-out camera gives: zeros, mask True.
    deployed = make_transforms(cfg, STATS, tokenizer, train=False)(sample, index=3)
    assert deployed["image_mask"]["left_wrist_0_rgb"] == True and not deployed["image"]["left_wrist_0_rgb"].any()  # noqa: E712
    assert deployed["image_mask"]["base_0_rgb"] == False  # noqa: E712
    train = make_transforms(cfg, STATS, tokenizer, train=True)(_sample(), index=3)
    assert train["image_mask"]["left_wrist_0_rgb"] == True and not train["image"]["left_wrist_0_rgb"].any()  # noqa: E712


def test_chain_rejects_an_action_chunk_of_the_wrong_horizon(tokenizer):
    sample = _sample()
    sample["actions"] = sample["actions"][:4]
    with pytest.raises(ValueError, match=r"chunk of 10 steps, got shape \(4, 7\)"):
        make_transforms(_cfg(), STATS, tokenizer, train=True)(sample, index=0)


def test_stack_batches_nested_samples(tokenizer):
    chain = make_transforms(_cfg(), STATS, tokenizer, train=False)
    batch = stack([chain(_sample(actions=False), i) for i in range(3)])
    assert batch["image"]["base_0_rgb"].shape == (3, 224, 224, 3)
    assert batch["image_mask"]["right_wrist_0_rgb"].tolist() == [False] * 3
    assert batch["tokenized_prompt"].shape == (3, 48)
