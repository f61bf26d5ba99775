"""The one place the attention mask and the RoPE positions are built."""

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


def make_attn_mask(input_mask: Bool[Array, "b s"], ar_mask: Bool[Array, " s"]) -> Bool[Array, "b s s"]:
    """Prefix-LM mask (big_vision rule): query i may attend key j iff cumsum(ar)[j] <= cumsum(ar)[i]
    and both tokens are valid. A token whose input_mask is False neither attends nor is attended to.
    Returned as [batch, query, key]."""
    cum = jnp.cumsum(ar_mask.astype(jnp.int32))
    causal = cum[None, :] <= cum[:, None]
    valid = input_mask[:, None, :] & input_mask[:, :, None]
    return causal[None] & valid


def make_positions(input_mask: Bool[Array, "b s"], offset: Int[Array, " b"] | None = None) -> Int[Array, "b s"]:
    """RoPE positions = cumsum(valid) - 1 (+ offset): invalid tokens do not advance the position, so a
    masked camera gives the same positions to every valid token as a camera that is not there."""
    pos = jnp.cumsum(input_mask.astype(jnp.int32), axis=1) - 1
    return pos if offset is None else pos + offset[:, None]
