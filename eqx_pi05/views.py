"""Camera removal on the data side: `view_dropout` and `view_remove` (research report §M1, §M2).

- `view_dropout`: the camera's pixels become zeros, its image_mask stays True, so the model still
  attends to a black frame. Train only.
- `view_remove`: the camera's image_mask becomes False, so its tokens are excluded from attention
  exactly like the padding slot `right_wrist_0_rgb`; pixels are zeroed too (cosmetic, it makes a
  leak impossible). Train and eval, with separate probabilities.

Whether a camera is hit is a per-sample draw from a hash of (mechanism, seed, sample index, camera),
so the same sample gets the same draw whatever the worker count, batch size or host count.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal

import numpy as np

Camera = Literal["agentview", "wrist"]
# agentview is LIBERO's third-person camera, wrist its eye-in-hand camera.
CAMERA_SLOTS: dict[str, str] = {"agentview": "base_0_rgb", "wrist": "left_wrist_0_rgb"}


@dataclasses.dataclass(frozen=True)
class CameraProbs:
    """Probability, per camera, that a sample has the mechanism applied."""

    agentview: float = 0.0
    wrist: float = 0.0

    def __post_init__(self):
        for camera in CAMERA_SLOTS:
            p = getattr(self, camera)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"camera probability {camera}: expected a value in [0, 1], got {p}")

    def active(self) -> dict[str, float]:
        return {camera: getattr(self, camera) for camera in CAMERA_SLOTS if getattr(self, camera) > 0}


@dataclasses.dataclass(frozen=True)
class ViewDropoutConfig:
    """Zero a camera's pixels while its mask stays True. There is no eval side: train only."""

    seed: int = 0
    train: CameraProbs = CameraProbs()


@dataclasses.dataclass(frozen=True)
class ViewRemoveConfig:
    """Set a camera's image_mask False, with separate train and eval probabilities."""

    seed: int = 0
    train: CameraProbs = CameraProbs()
    eval: CameraProbs = CameraProbs()


def check_exclusive(dropout: ViewDropoutConfig, remove: ViewRemoveConfig) -> None:
    """Raise if one camera is configured for both mechanisms: their effects are contradictory."""
    for camera in CAMERA_SLOTS:
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


def apply_view_dropout(inputs: dict, index: int, seed: int, probs: CameraProbs) -> dict:
    """Zero the pixels of each camera whose draw falls under its probability; masks untouched.

    `inputs` is the model-slot dict of `libero_inputs` (keys `image`, `image_mask`, ...).
    """
    return _apply(inputs, index, seed, probs, kind="view_dropout", mask_off=False)


def apply_view_remove(inputs: dict, index: int, seed: int, probs: CameraProbs) -> dict:
    """Set image_mask False (and zero the pixels) of each camera whose draw falls under its probability."""
    return _apply(inputs, index, seed, probs, kind="view_remove", mask_off=True)


def _apply(inputs: dict, index: int, seed: int, probs: CameraProbs, *, kind: str, mask_off: bool) -> dict:
    hit = [camera for camera, p in probs.active().items() if draw(kind, seed, index, camera) < p]
    if not hit:
        return inputs
    image, image_mask = dict(inputs["image"]), dict(inputs["image_mask"])
    for camera in hit:
        slot = CAMERA_SLOTS[camera]
        image[slot] = np.zeros_like(image[slot])
        if mask_off:
            image_mask[slot] = np.False_
    return {**inputs, "image": image, "image_mask": image_mask}
