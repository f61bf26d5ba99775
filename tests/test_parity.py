"""Our model against the reference's own outputs (golden fixture produced by openpi)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from eqx_pi05.parity import OUTPUTS, case_names, rel_err

TOL = 1e-5


@pytest.mark.parametrize("quantity", OUTPUTS)
@pytest.mark.parametrize("case", ["case_i", "case_ii", "case_iii"])
def test_matches_openpi_on_golden_fixture(golden, golden_outputs, case, quantity):
    _, cases, _ = golden
    err = rel_err(golden_outputs[case][quantity], cases[f"{case}/{quantity}"])
    assert err <= TOL, f"{case}/{quantity}: relative error {err:.2e} > {TOL}"


def test_intermediates_match_openpi(golden, golden_outputs):
    _, cases, _ = golden
    for case in case_names(cases):
        ours = golden_outputs[case]
        assert rel_err(ours["adarms_cond"], cases[f"{case}/adarms_cond"]) <= 1e-6
        np.testing.assert_array_equal(ours["positions"], cases[f"{case}/positions"])
        np.testing.assert_array_equal(ours["prefix_mask"], cases[f"{case}/prefix_mask"])
    # the time embedding follows openpi's float32 arithmetic bit for bit
    np.testing.assert_array_equal(golden_outputs["case_i"]["time_posemb"], cases["intermediate/time_posemb"])


def test_image_tokens_and_prompt_embedding_match_openpi(golden):
    import jax.numpy as jnp

    from eqx_pi05.parity import fixture_image

    model, cases, _ = golden
    tokens = model.img(jnp.asarray(fixture_image(cases, "base_0_rgb")), dtype=jnp.float32)
    assert rel_err(tokens, cases["intermediate/image_tokens/base_0_rgb"]) <= 1e-6
    emb = model.llm.embedder(jnp.asarray(cases["inputs/tokenized_prompt"]), jnp.float32)
    np.testing.assert_allclose(np.asarray(emb), cases["intermediate/lang_embed"], rtol=0, atol=1e-6)


def _write_fixture(dst, model, config, batch):
    """A fixture in the shared format, from our own model, at other sizes than the shipped one."""
    import jax.numpy as jnp

    from eqx_pi05.cameras import SLOTS
    from eqx_pi05.convert import openpi
    import equinox as eqx

    from eqx_pi05.loss import bc_per_sample
    from eqx_pi05.model import Observation, Pi05, sample_actions

    dst.mkdir()
    g = lambda c: {k: getattr(c, k) for k in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")}
    s = config.siglip
    (dst / "config.json").write_text(
        json.dumps(
            {
                "pi0_config": {"action_dim": config.action_dim, "action_horizon": config.action_horizon, "max_token_len": config.max_token_len},
                "paligemma_llm": g(config.paligemma),
                "action_expert": g(config.action_expert),
                "vocab_size": config.vocab_size,
                "siglip": {"width": s.width, "depth": s.depth, "mlp_dim": s.mlp_dim, "num_heads": s.num_heads, "patch_size": [14, 14], "image_size": [s.image_size] * 2},
            }
        )
    )
    np.savez(dst / "params.npz", **{k: np.asarray(v) for k, v in openpi.to_openpi(model).items()})
    arrays = {f"inputs/image_uint8/{k}": batch["image"][k] for k in SLOTS}
    rng = np.random.default_rng(1)
    noise = rng.normal(size=batch["actions"].shape).astype(np.float32)
    t = np.array([0.3, 0.8], np.float32)
    arrays.update({"inputs/state": batch["state"], "inputs/tokenized_prompt": batch["tokenized_prompt"], "inputs/tokenized_prompt_mask": batch["tokenized_prompt_mask"], "inputs/noise": noise, "inputs/time": t, "inputs/actions": batch["actions"]})
    obs = Observation.from_batch(batch)
    for k in SLOTS:
        arrays[f"case_i/image_mask/{k}"] = batch["image_mask"][k]
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * batch["actions"]
    arrays["case_i/x_t"] = x_t
    arrays["case_i/v_t"] = np.asarray(eqx.filter_jit(Pi05.velocity)(model, obs, jnp.asarray(x_t), jnp.asarray(t)))
    arrays["case_i/loss"] = np.asarray(eqx.filter_jit(bc_per_sample)(model, obs, jnp.asarray(batch["actions"]), jnp.asarray(noise), jnp.asarray(t)))
    arrays["case_i/sample_actions"] = np.asarray(sample_actions(model, obs, jnp.asarray(noise)))
    np.savez_compressed(dst / "cases.npz", **arrays)
    return arrays


def test_parity_cli_works_on_other_fixture_sizes_and_fails_on_a_wrong_reference(tmp_path, capsys):
    """The CLI is generic over the fixture format: other batch, prompt length, horizon, expert widths,
    SigLIP size; and it really compares: a perturbed reference makes it exit non-zero."""
    import jax

    from batches import random_batch
    from conftest import small_config
    from eqx_pi05.model import Pi05

    config = small_config()
    model = Pi05(config, key=jax.random.key(3))
    good = tmp_path / "good"
    arrays = _write_fixture(good, model, config, random_batch(config, batch=2))
    ok = subprocess.run([sys.executable, "-m", "eqx_pi05.parity", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "case_i: v_t=" in ok.stdout and "PASS" in ok.stdout

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    arrays["case_i/v_t"] = arrays["case_i/v_t"] * (1 + 1e-4)
    np.savez_compressed(bad / "cases.npz", **arrays)
    from eqx_pi05 import parity

    assert parity.main(parity.Args(fixture=str(bad))) != 0
    assert "FAIL" in capsys.readouterr().out
