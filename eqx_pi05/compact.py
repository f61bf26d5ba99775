"""Physical camera removal: leave out camera slots that no sample of the batch may attend to.

A slot whose image_mask is False for the whole batch contributes nothing: its tokens are masked out
of every attention row and column, and positions (cumsum of the valid mask) skip them. Leaving it out
of `Observation.images` is therefore the *same function* (up to float reordering) and saves the image
tower and ~256 tokens per layer. The decision needs concrete masks, so it is made on the host, before
the batch enters a jitted function (a new camera set costs one more trace, at most a handful).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from eqx_pi05.config import IMAGE_KEYS


def removable_cameras(image_mask: Mapping[str, object]) -> tuple[str, ...]:
    """Slots whose mask is False in every row (concrete numpy/jax arrays only)."""
    return tuple(k for k in IMAGE_KEYS if k in image_mask and not np.asarray(image_mask[k]).any())


def drop_cameras(batch: Mapping, names: Sequence[str]) -> dict:
    """The batch without the named camera slots (works on pipeline dicts: keys image / image_mask)."""
    unknown = set(names) - set(batch["image"])
    if unknown:
        raise KeyError(f"cannot drop camera(s) {sorted(unknown)}: batch has {sorted(batch['image'])}")
    out = dict(batch)
    out["image"] = {k: v for k, v in batch["image"].items() if k not in names}
    out["image_mask"] = {k: v for k, v in batch["image_mask"].items() if k not in names}
    return out


def compact(batch: Mapping) -> dict:
    """Drop every slot no row attends to; exact wherever it applies (padding slot, view_remove p=1,
    wrist-only evaluation). Mixed batches (some rows keep the camera) are left masked."""
    return drop_cameras(batch, removable_cameras(batch["image_mask"]))
