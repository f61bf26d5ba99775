"""Weights with optional LoRA adapters (openpi's `lora.Einsum` / `lora.FeedForward` math); which of them
train is decided by `eqx_pi05.trainable`.

LoRA replaces one axis of the weight by the rank: `lora_a` has the output axis replaced, `lora_b` the
input axis. `lora_b` starts at zero so a fresh adapter leaves the base model unchanged (openpi draws both
from N(0, 0.01); a zero `lora_b` is the usual LoRA convention and what "LoRA at init equals the base
model" needs). Attention adapters are scaled by alpha/rank; the MLP adapters are not scaled, exactly as
openpi's FeedForward (both released LoRA variants have alpha == rank, so the scale is 1 either way).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from eqx_pi05.config import LoRAConfig


class Einsum(eqx.Module):
    w: Float[Array, "..."]
    lora_a: Float[Array, "..."] | None
    lora_b: Float[Array, "..."] | None
    scaling: float = eqx.field(static=True)

    def __init__(
        self,
        shape: tuple[int, ...],
        in_axis,
        out_axis,
        *,
        key: PRNGKeyArray,
        lora: LoRAConfig | None = None,
        lora_scaled: bool = True,
    ):
        kw, ka = jax.random.split(key)
        batch = tuple(i for i in range(len(shape)) if i not in _axes(in_axis, len(shape)) + _axes(out_axis, len(shape)))
        init = jax.nn.initializers.lecun_normal(in_axis=in_axis, out_axis=out_axis, batch_axis=batch)
        self.w = init(kw, shape, jnp.float32)
        if lora is None:
            self.lora_a = self.lora_b = None
            self.scaling = 1.0
        else:
            shape_a, shape_b = list(shape), list(shape)
            shape_a[-1] = lora.rank
            shape_b[-2] = lora.rank
            self.lora_a = 0.01 * jax.random.normal(ka, tuple(shape_a), jnp.float32)
            self.lora_b = jnp.zeros(tuple(shape_b), jnp.float32)
            self.scaling = lora.scaling if lora_scaled else 1.0

    def __call__(self, eqn: str, x: Float[Array, "..."]) -> Float[Array, "..."]:
        dt = x.dtype
        out = jnp.einsum(eqn, x, self.w.astype(dt))
        if self.lora_a is not None:
            eqn_a, eqn_b = _lora_eqns(eqn)
            h = jnp.einsum(eqn_a, x, self.lora_a.astype(dt))
            h = jnp.einsum(eqn_b, h, self.lora_b.astype(dt))
            out = out + (h * self.scaling if self.scaling != 1.0 else h)
        return out


def _axes(a, n):
    a = a if isinstance(a, tuple) else (a,)
    return tuple(i % n for i in a)


def _lora_eqns(eqn: str) -> tuple[str, str]:
    """Weight axes (-2, -1) are (input, output); 'L' is the rank label (must not occur in eqn)."""
    lhs, rest = eqn.split(",")
    rhs, out = rest.split("->")
    if "L" in eqn:
        raise ValueError(f"einsum {eqn!r} already uses the LoRA label L")
    a_label, b_label = rhs[-2], rhs[-1]
    a_out = out.replace(b_label, "L")
    return f"{lhs},{rhs.replace(b_label, 'L')}->{a_out}", f"{a_out},{rhs.replace(a_label, 'L')}->{out}"
