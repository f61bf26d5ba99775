"""The model policy (tiny random model + the data pipeline's eval transform chain) under the audit."""

import dataclasses

import equinox as eqx
import jax
import numpy as np
import pytest

from eqx_pi05.config import SiglipConfig, pi05_tiny
from eqx_pi05.data.norm_stats import NormStats
from eqx_pi05.data.tokenizer import Tokenizer, train_sentencepiece
from eqx_pi05.data.transforms import Transforms
from eqx_pi05.eval.audit import RemovalAuditError, audit_removal
from eqx_pi05.eval.policy import make_policy
from eqx_pi05.eval.rollout import policy_observation
from eqx_pi05.eval.sim import SimObservation
from eqx_pi05.model import Pi05
from eqx_pi05.views import CameraProbs

PROMPTS = ["pick up the black bowl next to the ramekin and place it on the plate", "open the drawer"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    # 224-pixel input as the transforms produce, cut into 4×4 patches of 56 to keep it cheap.
    config = pi05_tiny(siglip=SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=56))
    model = eqx.filter_jit(lambda key: Pi05(config, key=key))(jax.random.key(0))
    # At init the SigLIP head and the adaRMS gates are zero (as openpi's), so actions would not depend
    # on the images at all: jitter every parameter to get a model that reads its inputs.
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    model = eqx.combine(params, static)
    path = train_sentencepiece(PROMPTS * 20, tmp_path_factory.mktemp("tok") / "tokenizer.model")
    stats = {k: NormStats(mean=np.zeros(d), std=np.ones(d), q01=-np.full(d, 2.0), q99=np.full(d, 2.0))
             for k, d in (("state", 8), ("actions", 7))}
    transforms = Transforms(norm_stats=stats, tokenizer=Tokenizer(path, config.max_token_len),
                            discrete_state_input=False, action_horizon=config.action_horizon, view_dropout_seed=0,
                            view_dropout=CameraProbs(), view_remove_seed=0, view_remove=CameraProbs(agentview=1.0))
    return model, transforms, stats


def _observation(seed=0, noise_seed=7):
    rng = np.random.default_rng(seed)
    obs = SimObservation(agentview=rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
                         wrist=rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), state=rng.normal(size=8))
    return policy_observation(obs, PROMPTS[0], noise_seed)


def test_model_policy_returns_unnormalized_seven_dim_chunks_deterministic_per_noise_seed(parts):
    policy = make_policy(*parts, batch_size=2)
    a, b = _observation(0, noise_seed=1), _observation(1, noise_seed=2)
    both = policy([a, b])
    assert both.shape == (2, 10, 7) and np.isfinite(both).all()
    np.testing.assert_array_equal(policy([a])[0], policy([a])[0])
    np.testing.assert_allclose(policy([b, a])[1], both[0], atol=1e-5)  # row order / batch mates do not matter
    assert not np.allclose(policy([_observation(0, noise_seed=3)])[0], both[0])  # the seed drives the noise
    assert np.abs(both).max() > 1.0  # unnormalized with q01/q99 = -2/2: beyond [-1, 1] somewhere


def test_model_policy_with_eval_view_remove_passes_the_removal_audit(parts):
    line = audit_removal(make_policy(*parts), _observation(), {"agentview": 1.0}, {})
    assert line == "eval physical view-removal {agentview=1} audit=pass"


def test_model_policy_whose_transforms_do_not_remove_agentview_fails_the_audit(parts):
    model, transforms, stats = parts
    leaky = dataclasses.replace(transforms, view_remove=CameraProbs())
    with pytest.raises(RemovalAuditError, match="reads a camera"):
        audit_removal(make_policy(model, leaky, stats), _observation(), {"agentview": 1.0}, {})
