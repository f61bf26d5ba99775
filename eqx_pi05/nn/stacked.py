"""Stacked layers, written once: built with `filter_vmap` over split keys, run with one `lax.scan`.

Every leaf of a stacked module has a leading depth axis. `fold` partitions the arrays from the
static parts, optionally wraps the per-layer body in `jax.checkpoint` (openpi's nothing_saveable
remat: recompute every layer in the backward pass), and scans. SigLIP and both Gemma experts use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
from jaxtyping import PRNGKeyArray, PyTree

Layer = TypeVar("Layer")  # one module, or a tuple of them (the two Gemma experts)


def stack(make: Callable[[PRNGKeyArray], Layer], key: PRNGKeyArray, depth: int) -> Layer:
    """`depth` layers `make(key_i)` as one module whose leaves are stacked on a leading axis."""
    return eqx.filter_vmap(make)(jax.random.split(key, depth))


def fold(
    body: Callable[[Layer, Any, Any], tuple[Any, Any]],
    layers: Layer,
    carry: PyTree,
    xs: PyTree = None,
    *,
    remat: bool = False,
    unroll: bool = False,
) -> tuple[PyTree, PyTree]:
    """`carry, ys = scan(body)` over the layers: `body(layer, carry, x) -> (carry, y)` sees one layer
    and the matching slice of `xs` (None: no per-layer input); `ys` come back stacked."""
    params, static = eqx.partition(layers, eqx.is_array)

    def step(carry, inputs):
        layer_params, x = inputs
        return body(eqx.combine(layer_params, static), carry, x)

    if remat:
        step = jax.checkpoint(step, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    return jax.lax.scan(step, carry, (params, xs), unroll=unroll)
