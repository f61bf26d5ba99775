"""LeRobot pi05 safetensors ⇄ our model: exact round trips, the golden v_t through a LeRobot file,
the full-size key set, PyTorch semantics of every kind of mapped weight, loud key errors."""

import dataclasses

import equinox as eqx
import ml_dtypes
import numpy as np
import pytest
from conftest import random_model, small_config
from safetensors.numpy import load_file, save_file

from eqx_pi05.config import GEMMA_DUMMY_LORA, pi05_full
from eqx_pi05.convert import lerobot, openpi
from eqx_pi05.model import Pi05
from eqx_pi05.parity import case_names, observation, rel_err

VIS = "model.paligemma_with_expert.paligemma.model.vision_tower.vision_model"
LLM = "model.paligemma_with_expert.paligemma.model.language_model"
EXP = "model.paligemma_with_expert.gemma_expert"


def lerobot_pi05_keys() -> dict[str, tuple[int, ...]]:
    """LeRobot's full-size pi05 `model.safetensors`, written out from the sources, not from our mapping:
    lerobot policies/pi05 (PI05Pytorch: PaliGemmaForConditionalGeneration + GemmaForCausalLM expert with
    adaRMS `dense`, embed_tokens deleted, lm_heads kept, the VLM's tied embedding saved as its lm_head)
    and openpi's convert_jax_model_to_pytorch.py for the shapes."""
    vocab, vw, vdepth, vmlp, patches = 257_152, 1152, 27, 4304, 256
    w, mlp, depth, q, kv = 2048, 16_384, 18, 8 * 256, 1 * 256
    ew, emlp = 1024, 4096
    keys = {
        f"{VIS}.embeddings.patch_embedding.weight": (vw, 3, 14, 14),
        f"{VIS}.embeddings.patch_embedding.bias": (vw,),
        f"{VIS}.embeddings.position_embedding.weight": (patches, vw),
        f"{VIS}.post_layernorm.weight": (vw,),
        f"{VIS}.post_layernorm.bias": (vw,),
        "model.paligemma_with_expert.paligemma.model.multi_modal_projector.linear.weight": (w, vw),
        "model.paligemma_with_expert.paligemma.model.multi_modal_projector.linear.bias": (w,),
        "model.paligemma_with_expert.paligemma.lm_head.weight": (vocab, w),
        f"{LLM}.norm.weight": (w,),
        f"{EXP}.model.norm.dense.weight": (3 * ew, ew),
        f"{EXP}.model.norm.dense.bias": (3 * ew,),
        f"{EXP}.lm_head.weight": (vocab, ew),
        "model.action_in_proj.weight": (ew, 32),
        "model.action_in_proj.bias": (ew,),
        "model.action_out_proj.weight": (32, ew),
        "model.action_out_proj.bias": (32,),
        "model.time_mlp_in.weight": (ew, ew),
        "model.time_mlp_in.bias": (ew,),
        "model.time_mlp_out.weight": (ew, ew),
        "model.time_mlp_out.bias": (ew,),
    }
    for i in range(vdepth):
        p = f"{VIS}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys |= {f"{p}.self_attn.{proj}.weight": (vw, vw), f"{p}.self_attn.{proj}.bias": (vw,)}
        keys |= {f"{p}.mlp.fc1.weight": (vmlp, vw), f"{p}.mlp.fc1.bias": (vmlp,)}
        keys |= {f"{p}.mlp.fc2.weight": (vw, vmlp), f"{p}.mlp.fc2.bias": (vw,)}
        for norm in ("layer_norm1", "layer_norm2"):
            keys |= {f"{p}.{norm}.weight": (vw,), f"{p}.{norm}.bias": (vw,)}
    for i in range(depth):
        for p, width, hidden in ((f"{LLM}.layers.{i}", w, mlp), (f"{EXP}.model.layers.{i}", ew, emlp)):
            keys |= {
                f"{p}.self_attn.q_proj.weight": (q, width),
                f"{p}.self_attn.k_proj.weight": (kv, width),
                f"{p}.self_attn.v_proj.weight": (kv, width),
                f"{p}.self_attn.o_proj.weight": (width, q),
                f"{p}.mlp.gate_proj.weight": (hidden, width),
                f"{p}.mlp.up_proj.weight": (hidden, width),
                f"{p}.mlp.down_proj.weight": (width, hidden),
            }
        for norm in ("input_layernorm", "post_attention_layernorm"):
            keys[f"{LLM}.layers.{i}.{norm}.weight"] = (w,)
            keys[f"{EXP}.model.layers.{i}.{norm}.dense.weight"] = (3 * ew, ew)
            keys[f"{EXP}.model.layers.{i}.{norm}.dense.bias"] = (3 * ew,)
    return keys


def _leaves(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in openpi.to_openpi(model).items()}


def _assert_same_params(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert sorted(la) == sorted(lb)
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


@pytest.fixture(scope="module")
def small():
    config = small_config()
    return random_model(config), config


def test_full_size_export_from_the_abstract_model_has_exactly_lerobots_812_keys_and_shapes():
    reference = lerobot_pi05_keys()
    assert len(reference) == 812  # vision 437 + projector 2 + VLM 164 + expert 201 + projections 8
    exported = eqx.filter_eval_shape(lerobot.to_lerobot, openpi.abstract_model(pi05_full()))
    ours = {k: tuple(v.shape) for k, v in exported.items()}
    assert set(ours) == set(reference), (sorted(set(ours) - set(reference))[:5], sorted(set(reference) - set(ours))[:5])
    assert {k: s for k, s in ours.items() if reference[k] != s} == {}


def test_export_then_import_through_a_safetensors_file_is_bit_exact(small, tmp_path):
    model, config = small
    path = lerobot.save(model, tmp_path / "pretrained_model")
    assert path == tmp_path / "pretrained_model" / "model.safetensors"
    tensors = load_file(path)
    assert {k: v.shape for k, v in tensors.items()} == lerobot.lerobot_shapes(config)
    assert all(v.dtype == np.float32 for v in tensors.values())
    _assert_same_params(lerobot.load(tmp_path / "pretrained_model", config), model)


def test_golden_model_through_a_lerobot_file_gives_the_fixture_v_t(golden, tmp_path):
    model, cases, config = golden
    back = lerobot.load(lerobot.save(model, tmp_path / "model.safetensors"), config)
    _assert_same_params(back, model)
    velocity = eqx.filter_jit(Pi05.velocity)
    noise, actions, t = (cases[f"inputs/{k}"] for k in ("noise", "actions", "time"))
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
    case = case_names(cases)[-1]  # the last case mixes camera masks across rows
    obs = observation(cases, case)
    v = np.asarray(velocity(back, obs, x_t, t))
    np.testing.assert_array_equal(v, np.asarray(velocity(model, obs, x_t, t)))
    assert rel_err(v, cases[f"{case}/v_t"]) < 1e-5


def test_lerobot_weights_compute_what_ours_compute_under_pytorch_conventions(small):
    """Each kind of mapped weight, used the way PyTorch/HF uses it (y = W x + b, `.view(heads, head_dim)`,
    conv2d on OIHW, adaRMS chunk(3)), gives what our einsum weights give: catches a mapping that is
    wrong in a self-consistent way, which a round trip cannot."""
    model, config = small
    lr = {k: np.asarray(v, np.float64) for k, v in lerobot.to_lerobot(model).items()}
    op = {k: np.asarray(v, np.float64) for k, v in openpi.to_openpi(model).items()}
    rng = np.random.default_rng(0)
    i = 0  # layer 0; layers come from the same indexing
    g0, g1, sg = config.paligemma, config.action_expert, config.siglip
    for sfx, pre, g in (("", LLM, g0), ("_1", f"{EXP}.model", g1)):
        x = rng.normal(size=g.width)
        lay = f"{pre}.layers.{i}"
        q = (lr[f"{lay}.self_attn.q_proj.weight"] @ x).reshape(g.num_heads, g.head_dim)
        np.testing.assert_allclose(q, np.einsum("d,ndh->nh", x, op[f"PaliGemma/llm/layers/attn/q_einsum{sfx}/w"][i]), atol=1e-9)
        for c, name in enumerate(("k_proj", "v_proj")):
            k = (lr[f"{lay}.self_attn.{name}.weight"] @ x).reshape(g.num_kv_heads, g.head_dim)
            np.testing.assert_allclose(k, np.einsum("d,kdh->kh", x, op[f"PaliGemma/llm/layers/attn/kv_einsum{sfx}/w"][i, c]), atol=1e-9)
        a = rng.normal(size=(g.num_heads, g.head_dim))
        o = lr[f"{lay}.self_attn.o_proj.weight"] @ a.reshape(-1)
        np.testing.assert_allclose(o, np.einsum("nh,nhd->d", a, op[f"PaliGemma/llm/layers/attn/attn_vec_einsum{sfx}/w"][i]), atol=1e-9)
        gating = op[f"PaliGemma/llm/layers/mlp{sfx}/gating_einsum"][i]
        np.testing.assert_allclose(lr[f"{lay}.mlp.gate_proj.weight"] @ x, x @ gating[0], atol=1e-9)
        np.testing.assert_allclose(lr[f"{lay}.mlp.up_proj.weight"] @ x, x @ gating[1], atol=1e-9)
        h = rng.normal(size=g.mlp_dim)
        np.testing.assert_allclose(lr[f"{lay}.mlp.down_proj.weight"] @ h, h @ op[f"PaliGemma/llm/layers/mlp{sfx}/linear"][i], atol=1e-9)
    # adaRMS: PiGemmaRMSNorm's dense(cond).chunk(3) = (scale, shift, gate), as openpi's Dense_0 split.
    cond = rng.normal(size=g1.width)
    dense = lr[f"{EXP}.model.layers.{i}.input_layernorm.dense.weight"] @ cond + lr[f"{EXP}.model.layers.{i}.input_layernorm.dense.bias"]
    ours = cond @ op["PaliGemma/llm/layers/pre_attention_norm_1/Dense_0/kernel"][i] + op["PaliGemma/llm/layers/pre_attention_norm_1/Dense_0/bias"][i]
    for a, b in zip(np.split(dense, 3), np.split(ours, 3)):
        np.testing.assert_allclose(a, b, atol=1e-9)
    # SigLIP attention: q/k/v with bias, viewed (heads, head_dim); out_proj over the flattened heads.
    x, mha, vl = rng.normal(size=sg.width), "PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0", f"{VIS}.encoder.layers.{i}"
    heads = (sg.num_heads, sg.width // sg.num_heads)
    for ours_name, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        y = (lr[f"{vl}.self_attn.{name}.weight"] @ x + lr[f"{vl}.self_attn.{name}.bias"]).reshape(heads)
        np.testing.assert_allclose(y, np.einsum("d,dnh->nh", x, op[f"{mha}/{ours_name}/kernel"][i]) + op[f"{mha}/{ours_name}/bias"][i], atol=1e-9)
    a = rng.normal(size=heads)
    y = lr[f"{vl}.self_attn.out_proj.weight"] @ a.reshape(-1) + lr[f"{vl}.self_attn.out_proj.bias"]
    np.testing.assert_allclose(y, np.einsum("nh,nhd->d", a, op[f"{mha}/out/kernel"][i]) + op[f"{mha}/out/bias"][i], atol=1e-9)
    # Patch embedding: torch conv2d (OIHW weight) on one CHW patch = our HWIO kernel on the HWC patch.
    patch = rng.normal(size=(3, sg.patch_size, sg.patch_size))
    torch_out = np.einsum("ocij,cij->o", lr[f"{VIS}.embeddings.patch_embedding.weight"], patch)
    np.testing.assert_allclose(torch_out, np.einsum("ijco,ijc->o", op["PaliGemma/img/embedding/kernel"], patch.transpose(1, 2, 0)), atol=1e-9)
    np.testing.assert_array_equal(lr[f"{VIS}.embeddings.position_embedding.weight"], op["PaliGemma/img/pos_embedding"][0])
    # nn.Linear projections; the tied VLM embedding under lm_head; the expert's unused lm_head zero.
    x = rng.normal(size=config.action_dim)
    np.testing.assert_allclose(lr["model.action_in_proj.weight"] @ x + lr["model.action_in_proj.bias"], x @ op["action_in_proj/kernel"] + op["action_in_proj/bias"], atol=1e-9)
    np.testing.assert_array_equal(lr["model.paligemma_with_expert.paligemma.lm_head.weight"], op["PaliGemma/llm/embedder/input_embedding"])
    assert not lr[f"{EXP}.lm_head.weight"].any() and lr[f"{EXP}.lm_head.weight"].shape == (config.vocab_size, g1.width)


def test_missing_unknown_and_misshapen_keys_are_each_named(small):
    model, config = small
    tensors = {k: np.asarray(v) for k, v in lerobot.to_lerobot(model).items()}
    del tensors["model.time_mlp_in.bias"]
    tensors["model.state_proj.weight"] = np.zeros((32, 32), np.float32)
    tensors[f"{LLM}.layers.1.self_attn.q_proj.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError) as err:
        lerobot.from_lerobot(tensors, config)
    msg = str(err.value)
    assert "3 LeRobot key problem(s)" in msg
    assert "model.time_mlp_in.bias: missing (expected (32,))" in msg
    assert "model.state_proj.weight: unknown (shape (32, 32))" in msg
    assert f"{LLM}.layers.1.self_attn.q_proj.weight: expected (128, 64), got (64, 64)" in msg


def test_openpi_pytorch_names_without_the_model_prefix_load_with_prefix_empty(small):
    model, config = small
    tensors = {k: np.asarray(v) for k, v in lerobot.to_lerobot(model, prefix="").items()}
    assert not any(k.startswith("model.") for k in tensors)
    _assert_same_params(lerobot.from_lerobot(tensors, config, prefix=""), model)
    with pytest.raises(ValueError, match="unknown"):
        lerobot.from_lerobot(tensors, config)


def test_embed_tokens_is_read_as_the_tied_lm_head_and_must_agree_with_it(small):
    model, config = small
    tensors = {k: np.asarray(v) for k, v in lerobot.to_lerobot(model).items()}
    head = "model.paligemma_with_expert.paligemma.lm_head.weight"
    only_embed = {**{k: v for k, v in tensors.items() if k != head}, f"{LLM}.embed_tokens.weight": tensors[head]}
    _assert_same_params(lerobot.from_lerobot(only_embed, config), model)
    _assert_same_params(lerobot.from_lerobot({**tensors, f"{LLM}.embed_tokens.weight": tensors[head]}, config), model)
    with pytest.raises(ValueError, match="both present and different"):
        lerobot.from_lerobot({**tensors, f"{LLM}.embed_tokens.weight": tensors[head] + 1}, config)


def test_expert_lm_head_is_optional_on_import(small):
    model, config = small
    tensors = {k: np.asarray(v) for k, v in lerobot.to_lerobot(model).items() if k != f"{EXP}.lm_head.weight"}
    _assert_same_params(lerobot.from_lerobot(tensors, config), model)


def test_bfloat16_weights_widen_exactly(small, tmp_path):
    model, config = small
    bf16 = {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in lerobot.to_lerobot(model).items()}
    save_file(bf16, tmp_path / "model.safetensors")
    back = _leaves(lerobot.load(tmp_path / "model.safetensors", config))
    rounded = _leaves(lerobot.from_lerobot({k: v.astype(np.float32) for k, v in bf16.items()}, config))
    for k in back:
        np.testing.assert_array_equal(back[k], rounded[k], err_msg=k)
    assert max(float(np.max(np.abs(back[k] - v))) for k, v in _leaves(model).items()) > 0  # it was rounded


def test_lora_models_refuse_export_and_lora_configs_import_with_fresh_adapters(small):
    model, config = small
    lora_config = dataclasses.replace(config, paligemma=dataclasses.replace(config.paligemma, lora=GEMMA_DUMMY_LORA.lora))
    tensors = {k: np.asarray(v) for k, v in lerobot.to_lerobot(model).items()}
    lora_model = lerobot.from_lerobot(tensors, lora_config, lora_seed=0)
    assert not np.asarray(lora_model.llm.layers[0].attn.q_einsum.lora_b).any()  # starts equal to the base
    with pytest.raises(ValueError, match="no LoRA weights"):
        lerobot.to_lerobot(lora_model)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        lerobot.read(tmp_path / "nope")


def test_cli_converts_lerobot_weights_to_an_openpi_checkpoint_and_back(small, tmp_path):
    model, config = small
    lerobot.save(model, tmp_path / "lerobot")
    lerobot.main(lerobot.ToOpenpi(tmp_path / "lerobot", tmp_path / "params"), config)
    _assert_same_params(openpi.load_checkpoint(tmp_path / "params", config), model)
    lerobot.main(lerobot.ToLerobot(tmp_path / "params", tmp_path / "again"), config)
    a, b = load_file(tmp_path / "lerobot" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
