"""Prompt trimming: leave out the trailing padding of the tokenized prompt, to a fixed bucket.

A padding token's mask is False: it neither attends nor is attended to, and positions (a cumsum of
the valid mask) skip it. So cutting the padding columns that follow every row's last valid token is
the *same function* (up to float reordering), as leaving out a masked camera is (`compact`). The
prompts of LIBERO are 15–21 PaliGemma tokens padded to `max_token_len` 200: after the cameras, the
padding is the largest block of wasted work. The cut needs concrete masks, so it is made on the host
before the batch enters a jitted function; the width is rounded up to one of a few fixed buckets, so
a run compiles one program per bucket it meets, not one per prompt length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from jaxtyping import Bool

PROMPT_BUCKETS = (32, 64, 128, 200)


def prompt_length(mask: Bool[np.ndarray, "b l"]) -> int:
    """The longest valid prompt of the batch: one past the last True column of any row (0 if none);
    measured to the last valid token, not counted, so a gap in a mask never loses a real token."""
    mask = np.asarray(mask, bool)
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[-1]) + 1 if cols.size else 0


def prompt_bucket(length: int, width: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    """The smallest bucket that holds `length` tokens, capped at the batch's padded `width`.
    A prompt longer than the largest bucket is an error: no real token is ever cut."""
    if length > width:
        raise ValueError(f"prompt length {length} is more than the batch's padded width {width}")
    if length > max(buckets):
        raise ValueError(f"a prompt of the batch is {length} tokens, more than the largest prompt bucket "
                         f"{max(buckets)} (buckets {tuple(buckets)}): shorten the prompt or add a larger bucket")
    return min(width, min(b for b in buckets if b >= length))


def trim_prompt(batch: Mapping, buckets: Sequence[int] = PROMPT_BUCKETS, length: int | None = None) -> dict:
    """The batch (pipeline dict: `tokenized_prompt`, `tokenized_prompt_mask`) with the prompt cut to
    `prompt_bucket` of its longest valid prompt. `length`: that longest prompt when it is decided
    elsewhere (the maximum over every process of a multi-host batch, so all agree on the width)."""
    mask = np.asarray(batch["tokenized_prompt_mask"], bool)
    longest = prompt_length(mask)
    if length is not None and length < longest:
        raise ValueError(f"trim_prompt: length={length} would cut real tokens: the batch's longest prompt is {longest}")
    width = prompt_bucket(longest if length is None else length, mask.shape[1], buckets)
    out = dict(batch)
    out["tokenized_prompt"] = np.asarray(batch["tokenized_prompt"])[:, :width]
    out["tokenized_prompt_mask"] = mask[:, :width]
    return out
