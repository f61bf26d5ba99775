"""Prompt trimming (trailing padding cut to a bucket) is exactly the untrimmed function: v_t, loss,
gradients, KV cache and sampled actions, on the golden fixture and on mixed-length batches."""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batches import random_batch
from conftest import random_model, small_config

from eqx_pi05.loss import bc_per_sample
from eqx_pi05.model import Observation, Pi05, sample_actions
from eqx_pi05.parity import case_names, observation
from eqx_pi05.prompt import PROMPT_BUCKETS, prompt_bucket, prompt_length, trim_prompt

TOL = 1e-6


def _trim_obs(obs: Observation, buckets) -> Observation:
    batch = trim_prompt({"tokenized_prompt": np.asarray(obs.tokenized_prompt), "tokenized_prompt_mask": np.asarray(obs.tokenized_prompt_mask)}, buckets)
    return eqx.tree_at(lambda o: (o.tokenized_prompt, o.tokenized_prompt_mask), obs,
                       (jnp.asarray(batch["tokenized_prompt"]), jnp.asarray(batch["tokenized_prompt_mask"])))


def _mean_loss(model, obs, actions, noise, t):
    return jnp.mean(bc_per_sample(model, obs, actions, noise, t))


def _assert_same_function(model, full: Observation, trimmed: Observation, actions, noise, t):
    """v_t, loss, every gradient leaf, the valid KV-cache entries and the sampled actions agree."""
    assert trimmed.tokenized_prompt.shape[1] < full.tokenized_prompt.shape[1]
    tt = t[:, None, None]
    x_t = tt * noise + (1 - tt) * actions
    v = eqx.filter_jit(Pi05.velocity)
    np.testing.assert_allclose(v(model, trimmed, x_t, t), v(model, full, x_t, t), rtol=1e-5, atol=TOL)
    grad = eqx.filter_jit(eqx.filter_value_and_grad(_mean_loss))
    (l0, g0), (l1, g1) = grad(model, full, actions, noise, t), grad(model, trimmed, actions, noise, t)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    assert sum(bool(np.any(np.asarray(g) != 0)) for g in leaves0) > len(leaves0) // 2  # the gradients carry signal
    chex.assert_trees_all_close(leaves1, leaves0, rtol=1e-5, atol=1e-6)
    prefill = eqx.filter_jit(Pi05.prefill)
    (k0, v0), m0 = prefill(model, full)
    (k1, v1), m1 = prefill(model, trimmed)
    for row in range(actions.shape[0]):
        valid0, valid1 = np.asarray(m0[row]), np.asarray(m1[row])
        assert valid0.sum() == valid1.sum()
        for a, b in ((k0, k1), (v0, v1)):
            np.testing.assert_allclose(np.asarray(b)[:, row, valid1], np.asarray(a)[:, row, valid0], rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(sample_actions(model, trimmed, noise), sample_actions(model, full, noise), rtol=0, atol=TOL)


def test_trimmed_equals_untrimmed_on_the_golden_cases(golden):
    """Fixture prompts are 33 and 27 valid tokens of 48 (a mixed-length batch): cut to 33 columns,
    every output and gradient is the untrimmed one, and the sampled actions still match openpi's."""
    model, cases, _ = golden
    noise, actions, t = (jnp.asarray(cases[f"inputs/{k}"]) for k in ("noise", "actions", "time"))
    for case in case_names(cases):
        full = observation(cases, case)
        trimmed = _trim_obs(full, buckets=(33,))
        assert trimmed.tokenized_prompt.shape[1] == 33
        _assert_same_function(model, full, trimmed, actions, noise, t)
        ref = cases[f"{case}/sample_actions"]
        np.testing.assert_allclose(sample_actions(model, trimmed, noise), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_trimmed_equals_untrimmed_on_a_mixed_length_batch():
    config = small_config(max_token_len=24)
    model = random_model(config, seed=5)
    batch = random_batch(config, batch=3, seed=1)
    lens = [3, 11, 7]  # the longest (11) falls in bucket 12 of 24
    batch["tokenized_prompt_mask"] = np.arange(24) < np.asarray(lens)[:, None]
    batch["tokenized_prompt"] = np.where(batch["tokenized_prompt_mask"], np.maximum(batch["tokenized_prompt"], 1), 0).astype(np.int32)
    trimmed = trim_prompt(batch, buckets=(6, 12, 24))
    assert trimmed["tokenized_prompt"].shape == (3, 12)
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.normal(size=(3, config.action_horizon, config.action_dim)), jnp.float32)
    t = jnp.asarray([0.2, 0.6, 0.95], jnp.float32)
    _assert_same_function(model, Observation.from_batch(batch), Observation.from_batch(trimmed), jnp.asarray(batch["actions"]), noise, t)


def test_bucket_is_the_smallest_that_holds_the_longest_prompt():
    assert [prompt_bucket(n, 200) for n in (0, 1, 21, 32, 33, 129, 200)] == [32, 32, 32, 32, 64, 200, 200]
    assert prompt_bucket(21, 16 + 8) == 24  # never wider than the batch
    mask = np.zeros((2, 200), bool)
    mask[0, :15], mask[1, :21] = True, True
    out = trim_prompt({"tokenized_prompt": np.ones((2, 200), np.int32), "tokenized_prompt_mask": mask})
    assert out["tokenized_prompt_mask"].shape == (2, 32) and out["tokenized_prompt_mask"].sum() == 36
    assert PROMPT_BUCKETS[-1] == 200  # pi05_libero's max_token_len: its prompts always fit


def test_a_gap_in_the_mask_never_loses_a_real_token():
    mask = np.zeros((1, 64), bool)
    mask[0, [0, 1, 40]] = True
    assert prompt_length(mask) == 41
    assert trim_prompt({"tokenized_prompt": np.ones((1, 64), np.int32), "tokenized_prompt_mask": mask})["tokenized_prompt"].shape == (1, 64)


def test_a_prompt_longer_than_the_largest_bucket_is_an_error_naming_its_length():
    mask = np.arange(300) < np.asarray([[250], [20]])
    with pytest.raises(ValueError, match="250 tokens, more than the largest prompt bucket 200"):
        trim_prompt({"tokenized_prompt": np.ones((2, 300), np.int32), "tokenized_prompt_mask": mask})
    with pytest.raises(ValueError, match="would cut real tokens"):
        trim_prompt({"tokenized_prompt": np.ones((2, 300), np.int32), "tokenized_prompt_mask": mask}, length=100)
