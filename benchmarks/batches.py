"""Model batches for tests and benchmarks, in the data pipeline's layout (`eqx_pi05.data.transforms`,
batched): {"image": {slot: uint8 (b, s, s, 3)}, "image_mask": {slot: bool (b,)}, "state": float32
(b, 32), "tokenized_prompt": int32 (b, L), "tokenized_prompt_mask": bool (b, L), "actions": float32
(b, H, action_dim)}, sized by a `Pi05Config`. `random_batch` fills it with seeded random values,
`abstract_batch` gives its ShapeDtypeStructs (full-size lowering, nothing allocated); the model's
view of either is `Observation.from_batch` (for an abstract batch: `jax.eval_shape` of it).

Tests import it (`tests/conftest.py` puts this folder on the path), benchmarks as a sibling module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from eqx_pi05.cameras import PADDING_SLOT, SLOTS
from eqx_pi05.config import Pi05Config
from eqx_pi05.data.transforms import MODEL_ACTION_DIM


def _check_slots(slots: Sequence[str], caller: str) -> None:
    unknown = sorted(set(slots) - set(SLOTS))
    if unknown:
        raise ValueError(f"{caller}: unknown camera slots {unknown}; expected a subset of {SLOTS}")


def abstract_batch(config: Pi05Config, batch: int, slots: Sequence[str] = SLOTS) -> dict:
    """ShapeDtypeStructs of a batch of `batch` rows holding the camera slots `slots`."""
    _check_slots(slots, "abstract_batch")
    s, n, sds = config.siglip.image_size, config.max_token_len, jax.ShapeDtypeStruct
    return dict(
        image={k: sds((batch, s, s, 3), np.uint8) for k in slots},
        image_mask={k: sds((batch,), np.bool_) for k in slots},
        state=sds((batch, MODEL_ACTION_DIM), np.float32),
        tokenized_prompt=sds((batch, n), np.int32),
        tokenized_prompt_mask=sds((batch, n), np.bool_),
        actions=sds((batch, config.action_horizon, config.action_dim), np.float32),
    )


def random_batch(config: Pi05Config, batch: int = 2, seed: int = 0, masks: Mapping[str, bool | Sequence[bool]] | None = None,
                 slots: Sequence[str] = SLOTS, prompt_len: int | None = None) -> dict:
    """A batch of `abstract_batch`'s shapes: uint8 images, normal state and actions, prompts of random
    ids in [1, vocab) padded with 0.

    masks: per slot in `slots`, one bool for every row or one per row (default: every camera valid,
    the padding slot not). slots: the camera slots present; images are drawn for every slot, so
    batches of one seed that differ in their slots share their values. prompt_len: valid tokens in
    every row (default: a random length in [2, max_token_len] per row; either way the other fields
    have the same values)."""
    _check_slots(slots, "random_batch")
    spec, n = abstract_batch(config, batch), config.max_token_len
    masks = {k: k != PADDING_SLOT for k in SLOTS} if masks is None else masks
    missing = sorted(set(slots) - set(masks))
    if missing:
        raise KeyError(f"random_batch: masks has no entry for slot(s) {missing}; it has {sorted(masks)}")
    wrong = {k: np.shape(masks[k]) for k in slots if np.shape(masks[k]) not in ((), (batch,))}
    if wrong:
        raise ValueError(f"random_batch: masks must be one bool or {batch} (batch) per slot; got shapes {wrong}")
    if prompt_len is not None and not 1 <= prompt_len <= n:
        raise ValueError(f"random_batch: prompt_len {prompt_len} is outside [1, max_token_len {n}]")

    # One draw order whatever the arguments (the lengths are drawn even when prompt_len replaces them):
    # the tests' tolerances and thresholds were set on these values.
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, n + 1, batch)
    lens = lens if prompt_len is None else np.full(batch, prompt_len)
    images = {k: rng.integers(0, 256, spec["image"][k].shape, dtype=np.uint8) for k in SLOTS}
    valid = np.arange(n) < lens[:, None]
    return dict(
        image={k: images[k] for k in slots},
        image_mask={k: np.full(batch, masks[k], bool) for k in slots},
        state=rng.normal(size=spec["state"].shape).astype(np.float32),
        tokenized_prompt=np.where(valid, rng.integers(1, config.vocab_size, valid.shape), 0).astype(np.int32),
        tokenized_prompt_mask=valid,
        actions=rng.normal(size=spec["actions"].shape).astype(np.float32),
    )
