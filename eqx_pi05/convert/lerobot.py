"""LeRobot pi05 `model.safetensors` (PyTorch names) ⇄ eqx_pi05.Pi05, every key mapped explicitly.

    python -m eqx_pi05.convert.lerobot to-openpi  LEROBOT_DIR_OR_FILE OUT_PARAMS_DIR
    python -m eqx_pi05.convert.lerobot to-lerobot OPENPI_PARAMS_DIR OUT_DIR_OR_FILE

LeRobot's `PI05Policy.model` is openpi's PyTorch port (`PI05Pytorch`), so its keys are openpi's
PyTorch names under `model.`. Facts this mapping rests on (lerobot `policies/pi05/modeling_pi05.py`,
`policies/pi_gemma.py`; openpi `examples/convert_jax_model_to_pytorch.py`):

- Layers are separate keys (`layers.{i}.`); ours, like openpi's, are stacked on a leading depth axis.
- `nn.Linear.weight` is (out, in): every kernel is transposed. Gemma q/k/v/o are single matrices
  over all heads (head-major rows), so the per-head einsum weights are reshaped; k and v come out of
  openpi's `kv_einsum[:, 0]` / `[:, 1]`, gate and up out of `gating_einsum[:, 0]` / `[:, 1]`.
- The SigLIP patch conv weight is OIHW (ours HWIO); the position embedding drops the leading 1.
- Gemma RMSNorm `weight` is used as `x·(1 + weight)` (PiGemmaRMSNorm), the same as openpi's
  `scale`: copied as is. adaRMS `dense` (cond → [scale | shift | gate]) is a plain linear layer.
- Only the VLM has a token embedding. It is tied to `paligemma.lm_head.weight`, and LeRobot's files
  are written with `safetensors.torch.save_model`, which keeps one name per tied tensor — the
  sorted-first, `lm_head` — so the embedding lives under `...paligemma.lm_head.weight`. We write it
  there and read `...language_model.embed_tokens.weight` as an alias.
- The action expert is a `GemmaForCausalLM` whose `embed_tokens` LeRobot deletes but whose
  `lm_head` (vocab, expert width) stays in the state dict; π0.5 never calls it. We export it as
  zeros (LeRobot loads with strict=True, so it must be there) and ignore it on import.
- All biases present: SigLIP (norms, q/k/v/out, fc1/fc2, patch conv), projector, adaRMS dense and the
  four action/time projections. Gemma linears have none.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
from collections.abc import Callable, Mapping
from typing import Annotated

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tyro
from jaxtyping import Array, Shaped

from eqx_pi05.config import Pi05Config, pi05_full
from eqx_pi05.convert import openpi
from eqx_pi05.model import Pi05

PREFIX = "model."  # LeRobot's PI05Policy wraps PI05Pytorch as `self.model`; openpi's own files have ""
PG = "paligemma_with_expert.paligemma"
VISION = f"{PG}.model.vision_tower.vision_model"
LLM = f"{PG}.model.language_model"
EXPERT = "paligemma_with_expert.gemma_expert"
EMBEDDING = f"{PG}.lm_head.weight"  # where the tied VLM token embedding is stored
EMBEDDING_ALIAS = f"{LLM}.embed_tokens.weight"  # its other name, written by some exporters
EXPERT_LM_HEAD = f"{EXPERT}.lm_head.weight"  # present in LeRobot files, unused by π0.5

# (to LeRobot: openpi part -> LeRobot array, from LeRobot: (LeRobot array, openpi part shape) -> part)
Codec = tuple[Callable, Callable]
SAME: Codec = (lambda x: x, lambda y, s: y)
T: Codec = (lambda x: x.T, lambda y, s: y.T)
FLAT: Codec = (lambda x: x.reshape(-1), lambda y, s: y.reshape(s))  # SigLIP q/k/v bias (N, H) ⇄ (N·H,)
POS: Codec = (lambda x: x.reshape(x.shape[1:]), lambda y, s: y.reshape(s))  # (1, n, D) ⇄ (n, D)
CONV: Codec = (lambda x: x.transpose(3, 2, 0, 1), lambda y, s: y.transpose(2, 3, 1, 0))  # HWIO ⇄ OIHW
# Gemma q (N, D, H) and k/v (K, D, H) ⇄ (heads·H, D), rows head-major as HF's `.view(..., heads, H)`.
HEADS_IN: Codec = (
    lambda x: x.transpose(0, 2, 1).reshape(-1, x.shape[1]),
    lambda y, s: y.reshape(s[0], s[2], s[1]).transpose(0, 2, 1),
)
HEADS_OUT: Codec = (lambda x: x.reshape(-1, x.shape[-1]).T, lambda y, s: y.T.reshape(s))  # (N, H, D) ⇄ (D, N·H)
VIT_HEADS_IN: Codec = (lambda x: x.reshape(x.shape[0], -1).T, lambda y, s: y.T.reshape(s))  # (D, N, H) ⇄ (N·H, D)

# openpi path -> [(LeRobot key without PREFIX, index into the openpi leaf, codec)]
Rules = dict[str, list[tuple[str, tuple[int, ...], Codec]]]


def _linear(rules: Rules, openpi_prefix: str, key: str, layers: int | None = None) -> None:
    """A Dense (kernel (in, out), bias) ⇄ nn.Linear (weight (out, in), bias), per layer if stacked."""
    parts = [(key, ())] if layers is None else [(key.format(i=i), (i,)) for i in range(layers)]
    rules[f"{openpi_prefix}/kernel"] = [(k + ".weight", idx, T) for k, idx in parts]
    rules[f"{openpi_prefix}/bias"] = [(k + ".bias", idx, SAME) for k, idx in parts]


def _per_layer(depth: int, key: str, codec: Codec, *split: int) -> list[tuple[str, tuple[int, ...], Codec]]:
    return [(key.format(i=i), (i, *split), codec) for i in range(depth)]


def rules(config: Pi05Config) -> Rules:
    """Every openpi leaf of a π0.5 model (LoRA adapters excepted) and the LeRobot keys it becomes."""
    r: Rules = {}
    img, blk = "PaliGemma/img", "PaliGemma/img/Transformer/encoderblock"
    mha = f"{blk}/MultiHeadDotProductAttention_0"
    vd, vl = config.siglip.depth, f"{VISION}.encoder.layers.{{i}}"
    r[f"{img}/embedding/kernel"] = [(f"{VISION}.embeddings.patch_embedding.weight", (), CONV)]
    r[f"{img}/embedding/bias"] = [(f"{VISION}.embeddings.patch_embedding.bias", (), SAME)]
    r[f"{img}/pos_embedding"] = [(f"{VISION}.embeddings.position_embedding.weight", (), POS)]
    for ours, theirs in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
        r[f"{blk}/{ours}/scale"] = _per_layer(vd, f"{vl}.{theirs}.weight", SAME)
        r[f"{blk}/{ours}/bias"] = _per_layer(vd, f"{vl}.{theirs}.bias", SAME)
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        r[f"{mha}/{ours}/kernel"] = _per_layer(vd, f"{vl}.self_attn.{theirs}.weight", VIT_HEADS_IN)
        r[f"{mha}/{ours}/bias"] = _per_layer(vd, f"{vl}.self_attn.{theirs}.bias", FLAT)
    r[f"{mha}/out/kernel"] = _per_layer(vd, f"{vl}.self_attn.out_proj.weight", HEADS_OUT)
    r[f"{mha}/out/bias"] = _per_layer(vd, f"{vl}.self_attn.out_proj.bias", SAME)
    _linear(r, f"{blk}/MlpBlock_0/Dense_0", f"{vl}.mlp.fc1", vd)
    _linear(r, f"{blk}/MlpBlock_0/Dense_1", f"{vl}.mlp.fc2", vd)
    r[f"{img}/Transformer/encoder_norm/scale"] = [(f"{VISION}.post_layernorm.weight", (), SAME)]
    r[f"{img}/Transformer/encoder_norm/bias"] = [(f"{VISION}.post_layernorm.bias", (), SAME)]
    _linear(r, f"{img}/head", f"{PG}.model.multi_modal_projector.linear")

    llm = "PaliGemma/llm"
    r[f"{llm}/embedder/input_embedding"] = [(EMBEDDING, (), SAME)]
    for sfx, model, gemma in (("", LLM, config.paligemma), ("_1", f"{EXPERT}.model", config.action_expert)):
        d, lay = gemma.depth, f"{model}.layers.{{i}}"
        r[f"{llm}/layers/attn/q_einsum{sfx}/w"] = _per_layer(d, f"{lay}.self_attn.q_proj.weight", HEADS_IN)
        r[f"{llm}/layers/attn/kv_einsum{sfx}/w"] = _per_layer(
            d, f"{lay}.self_attn.k_proj.weight", HEADS_IN, 0
        ) + _per_layer(d, f"{lay}.self_attn.v_proj.weight", HEADS_IN, 1)
        r[f"{llm}/layers/attn/attn_vec_einsum{sfx}/w"] = _per_layer(d, f"{lay}.self_attn.o_proj.weight", HEADS_OUT)
        r[f"{llm}/layers/mlp{sfx}/gating_einsum"] = _per_layer(d, f"{lay}.mlp.gate_proj.weight", T, 0) + _per_layer(
            d, f"{lay}.mlp.up_proj.weight", T, 1
        )
        r[f"{llm}/layers/mlp{sfx}/linear"] = _per_layer(d, f"{lay}.mlp.down_proj.weight", T)
        for ours, theirs in (("pre_attention_norm", "input_layernorm"), ("pre_ffw_norm", "post_attention_layernorm")):
            if sfx:
                _linear(r, f"{llm}/layers/{ours}_1/Dense_0", f"{lay}.{theirs}.dense", d)
            else:
                r[f"{llm}/layers/{ours}/scale"] = _per_layer(d, f"{lay}.{theirs}.weight", SAME)
    r[f"{llm}/final_norm/scale"] = [(f"{LLM}.norm.weight", (), SAME)]
    _linear(r, f"{llm}/final_norm_1/Dense_0", f"{EXPERT}.model.norm.dense")
    for name in ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out"):
        _linear(r, name, name)
    return r


def _check_no_lora(config: Pi05Config) -> None:
    for name in ("paligemma", "action_expert"):
        if getattr(config, name).lora is not None:
            raise ValueError(
                f"LeRobot export: config.{name}.lora = {getattr(config, name).lora}, but LeRobot's pi05 has no LoRA "
                "weights; merge the adapters into the base weights first"
            )


def to_lerobot(model: Pi05, prefix: str = PREFIX) -> dict[str, Shaped[Array, "..."]]:
    """{LeRobot key: array} of our model, float32. Traceable: `eqx.filter_eval_shape(to_lerobot,
    openpi.abstract_model(config))` lists the full-size keys and shapes without allocating them."""
    _check_no_lora(model.config)
    flat = openpi.to_openpi(model)
    out = {}
    for path, parts in rules(model.config).items():
        for key, idx, (to, _) in parts:
            out[prefix + key] = jnp.asarray(to(flat[path][idx]), jnp.float32)
    cfg = model.config
    out[prefix + EXPERT_LM_HEAD] = jnp.zeros((cfg.vocab_size, cfg.action_expert.width), jnp.float32)
    return out


def lerobot_shapes(config: Pi05Config, prefix: str = PREFIX) -> dict[str, tuple[int, ...]]:
    """{LeRobot key: shape} of a model of this config (LoRA adapters aside), from the abstract model."""
    base = dataclasses.replace(
        config,
        paligemma=dataclasses.replace(config.paligemma, lora=None),
        action_expert=dataclasses.replace(config.action_expert, lora=None),
    )
    arrays = eqx.filter_eval_shape(lambda m: to_lerobot(m, prefix), openpi.abstract_model(base))
    return {k: tuple(v.shape) for k, v in arrays.items()}


def from_lerobot(
    tensors: Mapping[str, np.ndarray], config: Pi05Config, *, prefix: str = PREFIX, lora_seed: int | None = None
) -> Pi05:
    """Our model from LeRobot's tensors (any float dtype; bf16 widens exactly). Missing, unknown or
    misshapen keys → one ValueError naming each. `lora_seed`: as `openpi.from_openpi`."""
    tensors = dict(tensors)
    errors = []
    alias, main = prefix + EMBEDDING_ALIAS, prefix + EMBEDDING
    if alias in tensors:
        embedding = tensors.pop(alias)
        if main not in tensors:
            tensors[main] = embedding
        elif not np.array_equal(tensors[main], embedding):
            errors.append(f"LeRobot tensors {main} and {alias}: both present and different (they are one tied tensor)")
    expected = lerobot_shapes(config, prefix)
    optional = {prefix + EXPERT_LM_HEAD}
    errors += [f"LeRobot key {k}: missing (expected {expected[k]})" for k in sorted(set(expected) - set(tensors) - optional)]
    errors += [f"LeRobot key {k}: unknown (shape {tuple(np.shape(tensors[k]))})" for k in sorted(set(tensors) - set(expected))]
    errors += [
        f"LeRobot key {k}: expected {expected[k]}, got {tuple(np.shape(tensors[k]))}"
        for k in sorted(set(expected) & set(tensors))
        if tuple(np.shape(tensors[k])) != expected[k]
    ]
    if errors:
        raise ValueError(f"{len(errors)} LeRobot key problem(s):\n  " + "\n  ".join(errors))
    leaf_shapes = {p: tuple(v.shape) for p, v in openpi.to_openpi(openpi.abstract_model(config)).items()}
    flat = {}
    for path, parts in rules(config).items():
        leaf = np.empty(leaf_shapes[path], np.float32)
        for key, idx, (_, back) in parts:
            leaf[idx] = back(np.asarray(tensors[prefix + key], np.float32), leaf[idx].shape)
        flat[path] = leaf
    return openpi.from_openpi(flat, config, lora_seed=lora_seed)


def _file(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    return path / "model.safetensors" if path.is_dir() or not path.suffix else path


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{key: numpy array} of a LeRobot `model.safetensors` (or of the pretrained directory holding it)."""
    from safetensors.numpy import load_file

    file = _file(path)
    if not file.is_file():
        raise FileNotFoundError(f"LeRobot weights {file}: no such file")
    return load_file(file)


def load(path: str | os.PathLike, config: Pi05Config, **kw) -> Pi05:
    return from_lerobot(read(path), config, **kw)


def save(model: Pi05, path: str | os.PathLike, prefix: str = PREFIX) -> pathlib.Path:
    """Write `model.safetensors` in LeRobot's names (a directory path gets the file inside it)."""
    from safetensors.numpy import save_file

    file = _file(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in to_lerobot(model, prefix).items()}
    save_file(arrays, file, metadata={"format": "pt"})  # the metadata transformers/LeRobot writes
    return file


@dataclasses.dataclass
class ToOpenpi:
    """LeRobot pi05 weights -> an openpi params checkpoint (orbax), e.g. to fine-tune from lerobot/pi05_base."""

    source: Annotated[pathlib.Path, tyro.conf.Positional]
    out: Annotated[pathlib.Path, tyro.conf.Positional]
    prefix: str = PREFIX


@dataclasses.dataclass
class ToLerobot:
    """An openpi params checkpoint (orbax) -> LeRobot's model.safetensors."""

    source: Annotated[pathlib.Path, tyro.conf.Positional]
    out: Annotated[pathlib.Path, tyro.conf.Positional]
    prefix: str = PREFIX


def main(args: ToOpenpi | ToLerobot, config: Pi05Config | None = None) -> int:
    config = config or pi05_full()
    if isinstance(args, ToOpenpi):
        openpi.save_checkpoint(load(args.source, config, prefix=args.prefix), args.out)
        print(f"wrote {args.out}")
    else:
        print(f"wrote {save(openpi.load_checkpoint(args.source, config), args.out, args.prefix)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.extras.subcommand_cli_from_dict({"to-openpi": ToOpenpi, "to-lerobot": ToLerobot})))
