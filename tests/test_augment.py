"""openpi's train-time augmentation: the geometric warp's coordinate convention, augmax's colour
curves, and which cameras get which transform."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from batches import random_batch

from eqx_pi05.augment import augment, augment_image, color_jitter, hsv_to_rgb, rgb_to_hsv, warp
from eqx_pi05.cameras import SLOTS
from eqx_pi05.config import pi05_tiny
from eqx_pi05.model import Observation

RNG = np.random.default_rng(0)
IMAGE = jnp.asarray(RNG.uniform(size=(12, 12, 3)), jnp.float32)


def test_warp_without_crop_shift_or_rotation_is_the_identity():
    np.testing.assert_allclose(warp(IMAGE, jnp.zeros(2), 1.0, jnp.float32(0)), IMAGE, atol=1e-6)


def test_warp_shift_translates_and_fills_with_zeros():
    out = warp(IMAGE, jnp.array([2.0, -3.0]), 1.0, jnp.float32(0))  # output (r, c) reads input (r + 2, c - 3)
    np.testing.assert_allclose(out[:10, 3:], IMAGE[2:, :9], atol=1e-6)
    assert np.all(np.asarray(out[10:]) == 0) and np.all(np.asarray(out[:, :3]) == 0)


def test_warp_quarter_turn_is_rot90():
    # augmax's matrix [[cos, sin], [-sin, cos]] on (row, col): output (r, c) reads input (c, n-1-r).
    out = warp(IMAGE, jnp.zeros(2), 1.0, jnp.float32(np.pi / 2))
    np.testing.assert_allclose(out, np.rot90(np.asarray(IMAGE), k=1), atol=1e-5)


def test_zoom_keeps_the_centre_and_scales_distances_to_it():
    image = jnp.zeros((224, 224, 3)).at[111:113, 111:113].set(1.0).at[11, 111:113].set(1.0)
    out = np.asarray(warp(image, jnp.zeros(2), 212 / 224, jnp.float32(0)))[..., 0]
    assert out[111:113, 111:113].min() > 0.9  # the centre stays put
    row = np.argmax(out[:60, 111])  # a point 100.5 px above the centre moves to 100.5·224/212 px above
    assert abs((111.5 - row) - 100.5 * 224 / 212) < 1.0


def test_color_jitter_curves_are_augmaxs():
    jitter = jax.jit(lambda x, b, c, h, apply=True: color_jitter(x, jnp.float32(b), jnp.float32(c), jnp.float32(h), jnp.bool_(apply)))
    gray, red = jnp.full((12, 12, 3), 0.4), jnp.zeros((12, 12, 3)).at[..., 0].set(1.0)
    np.testing.assert_allclose(jitter(gray, 0.2, 0, 0), 0.4 * 0.8 + 0.2, atol=1e-6)  # v·(1−b) + b
    np.testing.assert_allclose(jitter(gray, -0.2, 0, 0), 0.4 * 0.8, atol=1e-6)  # v·(1+b)
    slant = np.tan((0.3 + 1) * np.pi / 4)  # contrast 0.3, the linear middle piece around 0.5
    np.testing.assert_allclose(jitter(gray, 0, 0.3, 0), slant * (0.4 - 0.5) + 0.5, atol=1e-6)
    np.testing.assert_allclose(jitter(IMAGE, 0.3, 0.3, 0.1, False), IMAGE)
    np.testing.assert_allclose(jitter(IMAGE, 0, 0, 0), IMAGE, atol=1e-6)
    np.testing.assert_allclose(jitter(red, 0, 0, 1 / 3), np.zeros((12, 12, 3)) + [0.0, 1.0, 0.0], atol=1e-6)  # hue: red → green


@functools.partial(jax.jit, static_argnums=2)
def _augment_many(key, image, geometric):
    return jax.vmap(lambda k: augment_image(k, image, geometric))(jax.random.split(key, 64))


def test_colour_jitter_hits_about_half_the_images_and_geometry_only_non_wrist_cameras():
    image = jnp.full((224, 224, 3), 0.5).at[100:110, 150:160].set(1.0)  # a bright patch off-centre
    for geometric in (False, True):
        out = np.asarray(_augment_many(jax.random.key(0), image, geometric))
        jittered = np.abs(out[:, 50, 50] - 0.5).max(axis=-1) > 1e-4  # a background pixel far from the patch
        brightest = [np.unravel_index(np.argmax(o.max(-1)), o.shape[:2]) for o in out]
        moved = [not (100 <= r < 110 and 150 <= c < 160) or np.abs(o[100:110, 150:160] - o[105, 155]).max() > 1e-3
                 for o, (r, c) in zip(out, brightest)]
        assert 0.25 < jittered.mean() < 0.75, geometric  # augmax ColorJitter p = 0.5
        assert any(moved) == geometric  # crop / rotation move pixels; the wrist camera's never move


def test_augment_maps_each_camera_and_sample_and_keeps_the_range():
    batch = random_batch(pi05_tiny(), 3, slots=SLOTS[:2])  # 224×224, as augment expects
    batch["image"]["base_0_rgb"][1] = batch["image"]["base_0_rgb"][0]  # two equal samples
    obs = Observation.from_batch(batch)
    out = jax.jit(augment)(jax.random.key(1), obs)
    base = np.asarray(out.images["base_0_rgb"])
    assert base.min() >= -1 - 1e-5 and base.max() <= 1 + 1e-5
    assert not np.allclose(base[0], base[1])  # per-sample randomness
    assert not np.allclose(base[0], np.asarray(obs.images["base_0_rgb"][0]))
    np.testing.assert_array_equal(out.state, obs.state)
    np.testing.assert_array_equal(out.image_masks["base_0_rgb"], obs.image_masks["base_0_rgb"])


def test_hsv_round_trip():
    for x in (IMAGE, jnp.zeros((12, 12, 3)), jnp.ones((12, 12, 3))):
        np.testing.assert_allclose(jax.jit(lambda x: hsv_to_rgb(*rgb_to_hsv(x)))(x), x, atol=1e-6)


def test_colour_jitter_lifts_black_frames_to_grey_unless_kept_black():
    """augmax's brightness maps v to v(1 - b) + b, so view_dropout's zeros become a uniform grey in about a
    quarter of the samples; keep_black returns every all-black frame as it was and changes nothing else."""
    batch = random_batch(pi05_tiny(), 64, slots=SLOTS[:2])
    batch["image"]["base_0_rgb"][:48] = 0  # 48 zeroed agentview frames, 16 real ones
    batch["image"]["left_wrist_0_rgb"][5] = 0  # and one black wrist frame
    obs = Observation.from_batch(batch)
    key = jax.random.key(3)
    faithful = jax.jit(augment)(key, obs)
    kept = jax.jit(functools.partial(augment, keep_black=True))(key, obs)
    base = np.asarray(faithful.images["base_0_rgb"][:48])
    lifted = base.max(axis=(1, 2, 3)) > -1.0
    assert 0.1 < lifted.mean() < 0.4  # P(jitter) 0.5 x P(b > 0) 0.5
    assert np.all(base.max(axis=(1, 2, 3)) - base.min(axis=(1, 2, 3)) < 1e-5)  # uniform: the warp keeps black black
    np.testing.assert_array_equal(kept.images["base_0_rgb"][:48], -1.0)
    np.testing.assert_array_equal(kept.images["left_wrist_0_rgb"][5], -1.0)
    np.testing.assert_array_equal(kept.images["base_0_rgb"][48:], faithful.images["base_0_rgb"][48:])
    others = np.arange(64) != 5
    np.testing.assert_array_equal(np.asarray(kept.images["left_wrist_0_rgb"])[others],
                                  np.asarray(faithful.images["left_wrist_0_rgb"])[others])
