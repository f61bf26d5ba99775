"""The evaluation policy: openpi client observations -> LIBERO action chunks, with our model.

The input chain is the data pipeline's own (`data.transforms.make_transforms(..., train=False)`):
LiberoInputs -> view_remove with the variant's *eval* probabilities -> quantile normalization ->
resize -> tokenize -> pad; the output chain is `libero_outputs` (unnormalize, first 7 dims). So a
variant trained with agentview removed is evaluated with agentview removed, by the same code.

Sampling noise comes from each observation's `noise_seed` (rollout.noise_seed: task, trial, call),
never from a running RNG: the same observation gives the same actions, whatever else is in the
batch and whether the run was resumed — which the removal audit and the batched/sequential
equivalence rely on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eqx_pi05.data.norm_stats import NormStats
from eqx_pi05.data.transforms import Transforms, libero_outputs, stack
from eqx_pi05.eval.rollout import Policy
from eqx_pi05.model import Observation, Pi05, sample_actions


def make_policy(
    model: Pi05,
    transforms: Transforms,
    norm_stats: dict[str, NormStats],
    seed: int = 0,
    batch_size: int | None = None,
    num_steps: int = 10,
) -> Policy:
    """A batched policy. `batch_size`: pad every call to this many samples (the worker count), so
    the jitted sampler compiles once; padding rows are dropped."""
    config = model.config
    base_key = jax.random.key(seed)

    def noise(seed_: int) -> jax.Array:
        return jax.random.normal(jax.random.fold_in(base_key, seed_), (config.action_horizon, config.action_dim))

    def policy(observations: list[dict]) -> np.ndarray:
        n = len(observations)
        if n == 0:
            raise ValueError("policy: called with no observations")
        seeds = [int(obs["noise_seed"]) for obs in observations]
        # The sample index drives view_remove's per-sample draw (deterministic per query for p < 1).
        samples = [transforms(obs, index=s) for obs, s in zip(observations, seeds)]
        pad = max(0, (batch_size or n) - n)
        batch = stack(samples + samples[-1:] * pad)
        eps = jnp.stack([noise(s) for s in seeds + seeds[-1:] * pad])
        actions = sample_actions(model, Observation.from_batch(batch), eps, num_steps=num_steps)
        return libero_outputs(np.asarray(actions)[:n], norm_stats)

    return policy
