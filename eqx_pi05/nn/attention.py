"""The attention core, one typed function: the joint attention of the two Gemma experts, SigLIP's
encoder and benchmarks/attention.py all call it.

Grouped-query: `n` query heads share `k` key/value heads (n a multiple of k; SigLIP has n = k).
q arrives scaled. A False mask entry fills the logit with `BIG_NEG` (openpi / gemma's fill: finite,
so a fully masked row gives a uniform softmax, not NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

BIG_NEG = -2.3819763e38


def attention(
    q: Float[Array, "b t n h"],
    k: Float[Array, "b s k h"],
    v: Float[Array, "b s k h"],
    mask: Bool[Array, "b t s"] | None = None,
    *,
    logits_dtype=None,
) -> Float[Array, "b t n h"]:
    """softmax(q·kᵀ, where mask) · v per head. `logits_dtype`: the dtype of q·kᵀ and the softmax
    (openpi's Gemma: float32; None keeps the compute dtype, as flax's SigLIP); the probabilities are
    cast back to v's dtype."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if n % kh:
        raise ValueError(f"attention: {n} query heads are not a multiple of {kh} key/value heads")
    if mask is not None and mask.shape != (b, t, s):
        raise ValueError(f"attention: mask of shape {mask.shape}, expected (batch, queries, keys) = {(b, t, s)}")
    q = q.reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=logits_dtype)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, BIG_NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)
