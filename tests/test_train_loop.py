"""The training loop on the demo preset: every variant trains, resume is bit-identical, a NaN stops
the run and keeps the last good checkpoint, the EMA and LoRA updates are what they should be, and
the checkpoints load for evaluation.

SLOW (marked): about 80 s on two contended cores, most of it compiling seven step programs. A
smaller model than the demo's (depth 1) and XLA's fast-compile options keep it there; the compiled
steps are shared between tests (equal calls of the one jitted step hit jax.jit's cache).
"""

import collections
import dataclasses
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from conftest import compile_counts, random_model, small_run as small

from eqx_pi05.convert import openpi
from eqx_pi05 import checkpoints
from eqx_pi05.variants import VARIANTS
from eqx_pi05.train.loop import initial_state, train
from eqx_pi05.train.metrics import read
from eqx_pi05.train.sharding import make_mesh
from eqx_pi05.train.state import ema_update
from eqx_pi05.trainable import part_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    """Every variant trained for 2 steps (checkpoints after steps 1 and 2): {name: (config, records)}.
    The LoRA rows start from an openpi-format base checkpoint (random, every leaf non-zero), as a
    LoRA run starts from pi05_base: at a fresh init the frozen expert's adaRMS gates are zero, and
    no gradient would reach the adapters."""
    out = tmp_path_factory.mktemp("runs")
    configs = {name: small(name, demo_data, out / name, save_interval=1) for name in sorted(VARIANTS)}
    lora = configs["lora_wristonly_zero_p1"].model
    base = dataclasses.replace(lora, paligemma=dataclasses.replace(lora.paligemma, lora=None),
                               action_expert=dataclasses.replace(lora.action_expert, lora=None))
    openpi.save_checkpoint(random_model(base), out / "base_params")
    for name in (n for n in configs if n.startswith("lora_")):
        configs[name] = dataclasses.replace(configs[name], weights=str(out / "base_params"))
    runs = {name: (cfg, train(cfg)) for name, cfg in configs.items()}
    # B4 with a frozen checkpoint teacher: the pi05_libero run just trained (its EMA params).
    b4 = configs["selfdistill_only"]
    cfg = dataclasses.replace(b4, output_dir=out / "teacher_checkpoint", distill=dataclasses.replace(
        b4.distill, teacher="checkpoint", teacher_checkpoint=configs["pi05_libero"].run_dir))
    runs["teacher_checkpoint"] = (cfg, train(cfg))
    # B4 with the EMA teacher (demo EMA decay 0.95).
    cfg = dataclasses.replace(b4, output_dir=out / "teacher_ema", distill=dataclasses.replace(b4.distill, teacher="ema"))
    runs["teacher_ema"] = (cfg, train(cfg))
    return runs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_trains_two_steps_on_the_demo_preset(variant, runs):
    cfg, records = runs[variant]
    logged = read(cfg.run_dir / "metrics.jsonl")
    assert [r["step"] for r in logged] == [0, 1] and logged == records
    d = cfg.distill
    for r in logged:
        assert set(r) >= {"step", "loss", "bc", "distill", "anchor", "p", "grad_norm", "lr", "samples_per_s"}
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["lr"] > 0
        assert r["loss"] == pytest.approx(r["bc"] + (d.lam * r["distill"] + d.anchor_frac * r["anchor"] if d else 0.0), rel=1e-5)
        assert r["p"] == pytest.approx(0.0 if d is None else d.p_at(r["step"], 2))
        if d is not None and d.lam > 0:
            assert r["anchor"] > 0
            # p = 0: the student is the teacher, exactly; at the fresh init (adaRMS gates zero) actions
            # do not read the images yet, so the student differs only once a step has opened the gates.
            assert (r["distill"] > 0) == (r["p"] > 0 and r["step"] > 0)
    assert checkpoints.manager(cfg.run_dir / "checkpoints").all_steps() == [1, 2]
    saved = json.loads((cfg.run_dir / "config.json").read_text())
    assert saved["name"] == variant and saved["data"]["view_remove"] == dataclasses.asdict(cfg.data.view_remove)


def test_a_checkpoint_teacher_is_a_different_model_from_the_first_step(runs):
    (_, self_teacher), (_, frozen_teacher) = runs["selfdistill_only"], runs["teacher_checkpoint"]
    assert self_teacher[0]["distill"] == 0.0  # a fresh init does not read images yet: student = self-teacher
    assert frozen_teacher[0]["distill"] > 0  # the trained pi05_libero EMA does
    assert frozen_teacher[0]["bc"] == self_teacher[0]["bc"]  # same student, same batch, noise and time


def test_an_ema_teacher_is_the_live_model_at_the_first_step_and_the_average_after(runs):
    (_, self_teacher), (_, ema_teacher) = runs["selfdistill_only"], runs["teacher_ema"]
    for key in ("loss", "bc", "distill", "anchor"):  # step 0: EMA = params, so the same step
        assert ema_teacher[0][key] == pytest.approx(self_teacher[0][key], rel=1e-6)
    assert ema_teacher[1]["bc"] == pytest.approx(self_teacher[1]["bc"], rel=1e-5)  # same params after step 0
    # step 1: the target is 0.95·init + 0.05·params, not the live params
    assert abs(ema_teacher[1]["distill"] - self_teacher[1]["distill"]) > 1e-3 * self_teacher[1]["distill"]


def test_checkpoints_hold_the_ema_update_and_load_for_evaluation(runs):
    cfg, _ = runs["pi05_libero"]
    (ema1, _), (ema2, loaded_cfg) = (checkpoints.load_trained(cfg.run_dir / "checkpoints" / str(s)) for s in (1, 2))
    params2, _ = checkpoints.load_trained(cfg.run_dir, params="params")
    assert loaded_cfg == cfg
    assets = checkpoints.read_assets(cfg.run_dir)  # what evaluation reads instead of the config's paths
    assert assets.origin == "checkpoint" and assets.tokenizer_model == pathlib.Path(cfg.data.tokenizer).read_bytes()
    expected = ema_update(ema1, params2, cfg.ema_decay)
    for got, want in zip(jax.tree.leaves(ema2), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema2), jax.tree.leaves(params2)))


def test_lora_trains_adapters_and_openpis_unfrozen_parts_only(runs):
    cfg, _ = runs["lora_wristonly_zero_p1"]
    start = initial_state(cfg, make_mesh(1))  # what train() started from: the base checkpoint + fresh adapters
    before, (after, _) = start.model(), checkpoints.load_trained(cfg.run_dir, params="params")
    assert not np.any(before.llm.layers[0].attn.q_einsum.lora_b)  # LoRA starts as the base model
    for i in (0, 1):  # the LLM and the action expert: both LoRA in this variant
        old, new = before.llm.layers[i], after.llm.layers[i]
        np.testing.assert_array_equal(old.attn.q_einsum.w, new.attn.q_einsum.w)  # frozen base weights
        np.testing.assert_array_equal(old.mlp.gating_einsum.w, new.mlp.gating_einsum.w)
    # The adapters train (at depth 1 the LLM reaches the actions only through its keys and values).
    assert not np.array_equal(before.llm.layers[0].attn.kv_einsum.lora_b, after.llm.layers[0].attn.kv_einsum.lora_b)
    assert not np.array_equal(before.llm.layers[1].attn.q_einsum.lora_b, after.llm.layers[1].attn.q_einsum.lora_b)
    assert not np.array_equal(before.llm.layers[1].mlp.linear.lora_b, after.llm.layers[1].mlp.linear.lora_b)
    np.testing.assert_array_equal(before.llm.embedder.input_embedding, after.llm.embedder.input_embedding)
    assert not np.array_equal(before.action_out_proj.kernel, after.action_out_proj.kernel)  # as openpi: trainable
    assert not np.array_equal(before.img.patch_kernel, after.img.patch_kernel)
    assert start.ema is None and start.frozen.llm.layers[0].attn.q_einsum.w is not None
    assert start.params.llm.layers[0].attn.q_einsum.w is None  # no optimizer state for frozen weights


def test_an_unfinished_save_does_not_replace_the_latest_checkpoint(runs):
    cfg, _ = runs["pi05_libero"]
    (cfg.run_dir / "checkpoints" / "7.orbax-checkpoint-tmp-1234").mkdir()  # a save killed mid-way
    assert checkpoints.manager(cfg.run_dir / "checkpoints").latest_step() == 2
    assert checkpoints.step_dir(cfg.run_dir).name == "2"


def test_resume_continues_bit_identically_from_the_same_compiled_programs(demo_data, tmp_path):
    jax.clear_caches()  # so that the first run below compiles its programs
    with compile_counts() as compiled:
        straight = train(small("selfdistill_only", demo_data, tmp_path / "a", num_train_steps=6, save_interval=3))
    assert compiled["jit(_init)"] == 1 and compiled["jit(_sharded_step)"] >= 1
    with compile_counts() as compiled:  # equal runs (the same steps' batches) compile neither program again
        first = train(small("selfdistill_only", demo_data, tmp_path / "b", num_train_steps=3, save_interval=3))
        resumed = train(small("selfdistill_only", demo_data, tmp_path / "b", num_train_steps=6, save_interval=3, resume=True))
    assert compiled["jit(_init)"] == compiled["jit(_sharded_step)"] == 0
    assert [r["loss"] for r in first + resumed] == [r["loss"] for r in straight]
    assert [r["step"] for r in read(tmp_path / "b" / "metrics.jsonl")] == list(range(6))
    a, b = (checkpoints.load_trained(tmp_path / x, params="params")[0] for x in ("a", "b"))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    with pytest.raises(FileExistsError, match="--resume"):  # an existing run is never silently restarted
        train(small("selfdistill_only", demo_data, tmp_path / "b", num_train_steps=6))
    changed = small("selfdistill_only", demo_data, tmp_path / "b", num_train_steps=9, resume=True)
    changed = dataclasses.replace(changed, seed=1, distill=dataclasses.replace(changed.distill, lam=0.5))
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in distill.lam: checkpoint 1.0, now 0.5; seed: checkpoint 42"):
        train(changed)  # --resume continues the same run, or says which settings differ
    again = train(small("selfdistill_only", demo_data, tmp_path / "b", num_train_steps=3, save_interval=3, overwrite=True))
    assert [r["loss"] for r in again] == [r["loss"] for r in first]  # --overwrite: started over
    assert checkpoints.manager(tmp_path / "b" / "checkpoints").all_steps() == [3]


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(runs, demo_data, tmp_path):
    cfg, _ = runs["pi05_libero"]
    shutil.copytree(cfg.run_dir, tmp_path / "run")
    stats = json.loads((demo_data / "norm_stats.json").read_text())
    # Finite stats (NaN ones are refused at start) that normalize action 0 to inf from here on.
    stats["norm_stats"]["actions"]["q01"][0] = stats["norm_stats"]["actions"]["q99"][0] = -3e38
    (tmp_path / "nan_stats.json").write_text(json.dumps(stats))
    bad = dataclasses.replace(cfg, output_dir=tmp_path / "run", num_train_steps=4, resume=True,
                              data=dataclasses.replace(cfg.data, norm_stats=tmp_path / "nan_stats.json"))
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step 2: stopped; the last good checkpoint is step 2"):
        train(bad)
    assert checkpoints.manager(tmp_path / "run" / "checkpoints").all_steps() == [1, 2]


def test_frozen_backbone_lora_trains_adapters_and_action_heads_only(runs):
    cfg, _ = runs["lora_frozenvision_wristonly_zero_p1"]
    start = initial_state(cfg, make_mesh(1))
    before, (after, _) = start.model(), checkpoints.load_trained(cfg.run_dir, params="params")
    changed = collections.defaultdict(list)
    for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
        changed[part_of(path)].append(not np.array_equal(old, new))
    for part in ("vision", "llm", "action_expert"):  # the vision tower too, unlike openpi's filter above
        assert not any(changed[part]), part
    assert any(changed["lora"]) and any(changed["heads"])
    assert not np.array_equal(before.llm.layers[1].attn.q_einsum.lora_b, after.llm.layers[1].attn.q_einsum.lora_b)
    assert start.params.img.patch_kernel is None  # no optimizer state for the frozen tower
    saved = json.loads((cfg.run_dir / "config.json").read_text())["param_counts"]
    assert saved["vision"]["trainable"] == 0 < saved["vision"]["total"]
    assert saved["all"]["trainable"] == saved["lora"]["total"] + saved["heads"]["total"]
