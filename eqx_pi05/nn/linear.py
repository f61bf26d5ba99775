"""A dense layer with flax's (in, out) kernel layout, so checkpoints load without transposes."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


class Dense(eqx.Module):
    kernel: Float[Array, "i o"]
    bias: Float[Array, " o"]

    def __init__(self, in_features: int, out_features: int, *, key: PRNGKeyArray, zero_init: bool = False):
        if zero_init:
            self.kernel = jnp.zeros((in_features, out_features), jnp.float32)
        else:
            self.kernel = jax.nn.initializers.lecun_normal()(key, (in_features, out_features), jnp.float32)
        self.bias = jnp.zeros((out_features,), jnp.float32)

    def __call__(self, x: Float[Array, "*b i"], dtype=None) -> Float[Array, "*b o"]:
        """dtype None promotes input and params (nnx.Linear); a dtype casts all three to it (linen Dense)."""
        dtype = jnp.result_type(x, self.kernel) if dtype is None else dtype
        return jnp.dot(x.astype(dtype), self.kernel.astype(dtype)) + self.bias.astype(dtype)
