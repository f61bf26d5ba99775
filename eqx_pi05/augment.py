"""openpi's train-time image augmentation (`models/model.py:preprocess_observation`, augmax 0.4.1), in JAX.

Per camera slot, per sample (its own key from `jax.random.split(key, b)`, the same key for every
slot, as openpi), on images mapped [−1, 1] → [0, 1] and back:

- non-wrist slots: RandomCrop to 95% (212×212 of 224) → Resize back to 224 → Rotate uniformly in
  ±5°, fused into one bilinear resampling (augmax composes the coordinate maps; outside → 0);
- every slot: augmax `ColorJitter(brightness=0.3, contrast=0.4, saturation=0.5)` as it runs in
  augmax 0.4.1: with its defaults hue=0.1 and p=0.5 (applied to half the images), brightness and
  contrast act on the HSV value, hue shifts by U(−0.1, 0.1); the saturation adjustment's result is
  discarded there (augmax computes it and drops it), so saturation is unchanged here too.

The random numbers are drawn with augmax's key splits, so given the same per-image key the
parameters are augmax's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from eqx_pi05.model import Observation

CROP_FRACTION = 0.95
MAX_ROTATION_DEG = 5.0
BRIGHTNESS, CONTRAST, HUE, SATURATION = 0.3, 0.4, 0.1, 0.5
JITTER_P = 0.5


def warp(
    image: Float[Array, "h w c"], shift: Float[Array, "2"], scale: float, theta: Float[Array, ""]
) -> Float[Array, "h w c"]:
    """Sample `image` at  c + shift + scale·R(theta)·(p − c)  for every output pixel p = (row, col),
    c the image centre, bilinear, zeros outside (augmax's GeometricChain of RandomCrop, Resize, Rotate)."""
    h, w, _ = image.shape
    centre = jnp.array([h / 2 - 0.5, w / 2 - 0.5]).reshape(2, 1, 1)
    grid = jnp.mgrid[0:h, 0:w].astype(jnp.float32) - centre
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    rows = scale * (cos * grid[0] + sin * grid[1])
    cols = scale * (-sin * grid[0] + cos * grid[1])
    coords = jnp.stack([rows, cols]) + shift.reshape(2, 1, 1) + centre
    sample = lambda channel: jax.scipy.ndimage.map_coordinates(channel, list(coords), order=1, mode="constant", cval=0.0)  # noqa: E731
    return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)


def rgb_to_hsv(rgb: Float[Array, "*p 3"]) -> tuple[Float[Array, "*p"], Float[Array, "*p"], Float[Array, "*p"]]:
    value = jnp.max(rgb, axis=-1)
    span = value - jnp.min(rgb, axis=-1)
    top = jnp.argmax(rgb, axis=-1)
    second = jnp.take_along_axis(rgb, ((top + 1) % 3)[..., None], axis=-1)[..., 0]
    third = jnp.take_along_axis(rgb, ((top + 2) % 3)[..., None], axis=-1)[..., 0]
    hue = jnp.where(span == 0.0, 0.0, (2 * top + (second - third) / span) / 6)
    saturation = jnp.where(value == 0, 0.0, span / value)
    return hue, saturation, value


def hsv_to_rgb(hue: Float[Array, "*p"], saturation: Float[Array, "*p"], value: Float[Array, "*p"]) -> Float[Array, "*p 3"]:
    k = jnp.mod(jnp.array([5, 3, 1]) + hue[..., None] * 6, 6)
    return value[..., None] - (value * saturation)[..., None] * jnp.maximum(0, jnp.minimum(jnp.minimum(k, 4 - k), 1))


def color_jitter(
    image: Float[Array, "h w 3"], brightness: Float[Array, ""], contrast: Float[Array, ""], hue: Float[Array, ""], apply: Bool[Array, ""]
) -> Float[Array, "h w 3"]:
    """augmax's brightness / contrast (on the HSV value, GIMP's invertible curves) and hue shift."""
    h, s, v = rgb_to_hsv(image)
    v = jnp.where(brightness < 0.0, v * (1.0 + brightness), v * (1.0 - brightness) + brightness)
    slant = jnp.tan((contrast + 1.0) * (jnp.pi / 4))
    p1 = (slant - jnp.square(slant)) / (2 * (1 - jnp.square(slant)))  # NaN at contrast 0: the identity branch
    p2 = 1 - p1
    v = jnp.where(v < p1, v / slant, jnp.where(v > p2, v / slant + 1 - 1 / slant, slant * (v - 0.5) + 0.5))
    return jnp.where(apply, hsv_to_rgb(h + hue, s, v), image)


def _jitter(key: PRNGKeyArray, image: Float[Array, "h w 3"]) -> Float[Array, "h w 3"]:
    # ColorspaceChain of one transform splits its key once; ColorJitter splits 5 (4 strengths > 0, p < 1)
    # and pairs them with brightness, contrast, hue, saturation; p draws from the unsplit key.
    (key,) = jax.random.split(key, 1)
    kb, kc, kh, _ = jax.random.split(key, 5)[:4]
    amount = lambda k, s: jax.random.uniform(k, minval=-s, maxval=s)  # noqa: E731
    return color_jitter(image, amount(kb, BRIGHTNESS), amount(kc, CONTRAST), amount(kh, HUE), jax.random.bernoulli(key, JITTER_P))


def augment_image(key: PRNGKeyArray, image: Float[Array, "h w 3"], geometric: bool) -> Float[Array, "h w 3"]:
    """One [0, 1] image: augmax.Chain([RandomCrop, Resize, Rotate,] ColorJitter) with openpi's settings."""
    if not geometric:
        (k_color,) = jax.random.split(key, 1)
        return _jitter(k_color, image)
    k_geo, k_color = jax.random.split(key, 2)
    k_crop, _, k_rot = jax.random.split(k_geo, 3)
    h, w, _ = image.shape
    ch, cw = int(h * CROP_FRACTION), int(w * CROP_FRACTION)
    limit = jnp.array([(h - ch) / 2, (w - cw) / 2])
    shift = jax.random.uniform(k_crop, (2,), minval=-limit, maxval=limit)
    rad = math.radians(MAX_ROTATION_DEG)
    theta = jax.random.bernoulli(k_rot, 1.0) * jax.random.uniform(k_rot, minval=-rad, maxval=rad)
    return _jitter(k_color, warp(image, shift, ch / h, theta))


def augment(key: PRNGKeyArray, obs: Observation, keep_black: bool = False) -> Observation:
    """Every camera of `obs` augmented per sample; wrist slots (name contains "wrist") get colour only.

    As augmax, the colour jitter also lifts an all-black frame (view_dropout's zeros) to a uniform grey
    (v -> v·(1 − b) + b for brightness b > 0: about a quarter of the samples); `keep_black` returns every
    all-black frame unchanged instead (the other frames and their random draws are unchanged)."""
    images = {}
    for name, image in obs.images.items():
        keys = jax.random.split(key, image.shape[0])
        fn = lambda k, x, g="wrist" not in name: augment_image(k, x, g)  # noqa: E731
        out = jax.vmap(fn)(keys, image / 2.0 + 0.5) * 2.0 - 1.0
        if keep_black:
            black = jnp.all(image == -1.0, axis=(1, 2, 3))  # images are "b h w 3" (Observation)
            out = jnp.where(black[:, None, None, None], image, out)
        images[name] = out
    return obs.replace(images=images)
