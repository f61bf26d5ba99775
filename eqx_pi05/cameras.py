"""The cameras: one table of names, the padding slot, and three ways to take a camera away.

Each camera has four names: its model slot (openpi's observation key), the openpi client's request
key, the LeRobot feature of `physical-intelligence/libero`, and the simulator's camera (robosuite's
observation key). The model has a third slot, `PADDING_SLOT`, which LIBERO never fills: zeros with
its mask False (openpi's padding convention).

Three mechanisms, one verb each; each takes a pipeline dict (keys `image`, `image_mask`) or an
`Observation` (fields `images`, `image_masks`) and returns a new one:

- `zero`: the camera's pixels become zeros, its mask stays True: the model attends to a black frame
  (the report's view_dropout, §M1).
- `mask`: the camera's mask becomes False (in the given rows), so its tokens leave attention
  exactly like the padding slot (view_remove §M2 on the data side, the in-loss removal §M3).
- `drop`: the camera's slot leaves the batch altogether: the same function as `mask` in every row
  (positions are the cumsum of the valid mask), without its image tower and tokens ("compacted").

On the data side (`view_dropout`, `view_remove`) whether a sample's camera is hit is a draw from a
hash of (mechanism, seed, sample index, camera), so the same sample gets the same draw whatever the
worker count, batch size or host count.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from typing import Literal, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np


class CameraNames(NamedTuple):
    slot: str  # the model's observation key (openpi `image` / `image_mask` dicts)
    client_key: str  # the openpi client's request key (LIBERO example, our server)
    lerobot_feature: str  # the LeRobot dataset feature (physical-intelligence/libero)
    sim_camera: str  # the simulator's camera (robosuite's camera name; its image is observation f"{name}_image")


Camera = Literal["agentview", "wrist"]
# agentview is LIBERO's third-person camera, wrist its eye-in-hand camera.
CAMERAS: dict[str, CameraNames] = {
    "agentview": CameraNames("base_0_rgb", "observation/image", "image", "agentview"),
    "wrist": CameraNames("left_wrist_0_rgb", "observation/wrist_image", "wrist_image", "robot0_eye_in_hand"),
}
PADDING_SLOT = "right_wrist_0_rgb"
# The model's slots in token order (openpi's IMAGE_KEYS).
SLOTS: tuple[str, ...] = (CAMERAS["agentview"].slot, CAMERAS["wrist"].slot, PADDING_SLOT)
CLIENT_KEYS: tuple[str, ...] = tuple(c.client_key for c in CAMERAS.values())


def slot(camera: Camera) -> str:
    return CAMERAS[camera].slot


# ---- the three verbs -------------------------------------------------------------------------------

Batch = TypeVar("Batch")


def _get(batch) -> tuple[dict, dict]:
    if isinstance(batch, Mapping):
        return dict(batch["image"]), dict(batch["image_mask"])
    return dict(batch.images), dict(batch.image_masks)


def _with(batch: Batch, images: dict, masks: dict) -> Batch:
    if isinstance(batch, Mapping):
        return {**batch, "image": images, "image_mask": masks}
    return dataclasses.replace(batch, images=images, image_masks=masks)


def _check(slots: Iterable[str], present: Mapping, verb: str) -> None:
    unknown = sorted(set(slots) - set(present))
    if unknown:
        raise KeyError(f"cannot {verb} camera slot(s) {unknown}: the batch has {sorted(present)}")


def zero(batch: Batch, slots: Iterable[str]) -> Batch:
    """`slots`' pixels set to zero; masks untouched (the model still attends to a black frame)."""
    images, masks = _get(batch)
    _check(slots, images, "zero")
    for s in slots:
        images[s] = jnp.zeros_like(images[s]) if isinstance(images[s], jax.Array) else np.zeros_like(images[s])
    return _with(batch, images, masks)


def mask(batch: Batch, slots: Iterable[str], rows=True) -> Batch:
    """`slots`' masks set False where `rows` is True (default: every row); a row already masked stays
    masked. Pixels are untouched: a masked token contributes nothing whatever its value."""
    images, masks = _get(batch)
    _check(slots, masks, "mask")
    for s in slots:
        xp = jnp if isinstance(masks[s], jax.Array) or isinstance(rows, jax.Array) else np
        masks[s] = xp.logical_and(masks[s], xp.logical_not(rows))
    return _with(batch, images, masks)


def drop(batch: Batch, slots: Iterable[str]) -> Batch:
    """The batch without `slots`: the same function as their masks False in every row, without their
    image tower and tokens."""
    slots = tuple(slots)
    images, masks = _get(batch)
    _check(slots, images, "drop")
    keep = lambda d: {k: v for k, v in d.items() if k not in slots}  # noqa: E731
    return _with(batch, keep(images), keep(masks))


def removable(image_mask: Mapping[str, object]) -> tuple[str, ...]:
    """Slots whose mask is False in every row (concrete numpy/jax arrays only)."""
    return tuple(k for k in SLOTS if k in image_mask and not np.asarray(image_mask[k]).any())


def compact(batch: Batch) -> Batch:
    """`drop` every slot no row attends to. Exact wherever it applies (padding slot, view_remove p=1,
    wrist-only evaluation); the decision needs concrete masks, so it is made on the host, before the
    batch enters a jitted function (a new camera set costs one more trace, at most a handful).
    Mixed batches (some rows keep the camera) are left masked."""
    return drop(batch, removable(_get(batch)[1]))


# ---- per-sample removal in the data pipeline (view_dropout, view_remove) ----------------------------


@dataclasses.dataclass(frozen=True)
class CameraProbs:
    """Probability, per camera, that a sample has the mechanism applied."""

    agentview: float = 0.0
    wrist: float = 0.0

    def __post_init__(self):
        for camera in CAMERAS:
            p = getattr(self, camera)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"camera probability {camera}: expected a value in [0, 1], got {p}")

    def active(self) -> dict[str, float]:
        return {camera: getattr(self, camera) for camera in CAMERAS if getattr(self, camera) > 0}

    def always(self) -> tuple[str, ...]:
        """The slots of the cameras hit in every sample (p = 1)."""
        return tuple(slot(c) for c, p in self.active().items() if p >= 1.0)


@dataclasses.dataclass(frozen=True)
class ViewDropoutConfig:
    """`zero` a camera per sample (mask stays True). There is no eval side: train only."""

    seed: int = 0
    train: CameraProbs = CameraProbs()


@dataclasses.dataclass(frozen=True)
class ViewRemoveConfig:
    """`mask` a camera per sample, pixels zeroed too; separate train and eval probabilities."""

    seed: int = 0
    train: CameraProbs = CameraProbs()
    eval: CameraProbs = CameraProbs()


def check_exclusive(dropout: ViewDropoutConfig, remove: ViewRemoveConfig) -> None:
    """Raise if one camera is configured for both mechanisms: their effects are contradictory."""
    for camera in CAMERAS:
        p_drop = getattr(dropout.train, camera)
        p_train, p_eval = getattr(remove.train, camera), getattr(remove.eval, camera)
        if p_drop > 0 and (p_train > 0 or p_eval > 0):
            raise ValueError(
                f"camera {camera!r} is configured twice: view_dropout.train.{camera}={p_drop} and "
                f"view_remove.train.{camera}={p_train} / view_remove.eval.{camera}={p_eval}; "
                "view_dropout (zeros, mask True) and view_remove (mask False) exclude each other, set one to 0"
            )


def draw(kind: str, seed: int, index: int, camera: str) -> float:
    """Uniform number in [0, 1) that depends only on its arguments (blake2b, not a global RNG)."""
    digest = hashlib.blake2b(f"{kind}/{seed}/{index}/{camera}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / 2.0**53  # 53 bits: exact in a float, never 1.0


def _hit(kind: str, index: int, seed: int, probs: CameraProbs) -> list[str]:
    return [slot(camera) for camera, p in probs.active().items() if draw(kind, seed, index, camera) < p]


def apply_view_dropout(inputs: dict, index: int, seed: int, probs: CameraProbs) -> dict:
    """`zero` each camera whose draw falls under its probability (one sample of `libero_inputs`)."""
    hit = _hit("view_dropout", index, seed, probs)
    return zero(inputs, hit) if hit else inputs


def apply_view_remove(inputs: dict, index: int, seed: int, probs: CameraProbs) -> dict:
    """`mask` each camera whose draw falls under its probability, and zero its pixels (cosmetic: it
    makes a leak impossible)."""
    hit = _hit("view_remove", index, seed, probs)
    return zero(mask(inputs, hit), hit) if hit else inputs
