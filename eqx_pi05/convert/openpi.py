"""openpi params (`PaliGemma/llm/layers/attn/q_einsum/w`, ...) ⇄ eqx_pi05.Pi05, every leaf mapped explicitly.

    python -m eqx_pi05.convert.openpi --check-shapes shared/fixtures/openpi_pi05_full_param_shapes.json

builds the full-size model with `jax.eval_shape` (nothing allocated) and compares it leaf by leaf with
an openpi param listing. Checkpoints: orbax PyTree checkpoints as openpi releases them (`.../params`,
top-level key `params`) or as its trainer writes them (every path ending in `value`); both load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping

import equinox as eqx
import jax
import numpy as np
import tyro

from eqx_pi05.config import Pi05Config, pi05_full
from eqx_pi05.model import Pi05

Getter = Callable[[Pi05], object]


def _dense(prefix: str, get: Getter) -> list[tuple[str, Getter]]:
    return [(f"{prefix}/kernel", lambda m: get(m).kernel), (f"{prefix}/bias", lambda m: get(m).bias)]


def _einsum(path: str, get: Getter, lora_names: tuple[str, str] | None) -> list[tuple[str, Getter]]:
    """`path` is the weight's own path; lora_names the openpi names of its adapters, if any."""
    pairs = [(path, lambda m: get(m).w)]
    if lora_names is not None:
        pairs += [(lora_names[0], lambda m: get(m).lora_a), (lora_names[1], lambda m: get(m).lora_b)]
    return pairs


def leaf_map(config: Pi05Config) -> list[tuple[str, Getter]]:
    """(openpi path, getter of our leaf) for every parameter of a π0.5 model of this config."""
    pairs: list[tuple[str, Getter]] = []
    img = "PaliGemma/img"
    blk = f"{img}/Transformer/encoderblock"
    mha = f"{blk}/MultiHeadDotProductAttention_0"
    pairs += [
        (f"{img}/embedding/kernel", lambda m: m.img.patch_kernel),
        (f"{img}/embedding/bias", lambda m: m.img.patch_bias),
        (f"{img}/pos_embedding", lambda m: m.img.pos_embedding),
        (f"{blk}/LayerNorm_0/scale", lambda m: m.img.blocks.norm_attn.scale),
        (f"{blk}/LayerNorm_0/bias", lambda m: m.img.blocks.norm_attn.bias),
        (f"{blk}/LayerNorm_1/scale", lambda m: m.img.blocks.norm_mlp.scale),
        (f"{blk}/LayerNorm_1/bias", lambda m: m.img.blocks.norm_mlp.bias),
        (f"{img}/Transformer/encoder_norm/scale", lambda m: m.img.encoder_norm.scale),
        (f"{img}/Transformer/encoder_norm/bias", lambda m: m.img.encoder_norm.bias),
    ]
    for name in ("query", "key", "value", "out"):
        pairs += [
            (f"{mha}/{name}/kernel", lambda m, n=name: getattr(m.img.blocks.attn, f"{n}_kernel")),
            (f"{mha}/{name}/bias", lambda m, n=name: getattr(m.img.blocks.attn, f"{n}_bias")),
        ]
    pairs += _dense(f"{blk}/MlpBlock_0/Dense_0", lambda m: m.img.blocks.mlp_in)
    pairs += _dense(f"{blk}/MlpBlock_0/Dense_1", lambda m: m.img.blocks.mlp_out)
    pairs += _dense(f"{img}/head", lambda m: m.img.head)

    llm = "PaliGemma/llm"
    pairs.append((f"{llm}/embedder/input_embedding", lambda m: m.llm.embedder.input_embedding))
    for i, cfg in enumerate((config.paligemma, config.action_expert)):
        sfx = "" if i == 0 else "_1"
        lay = f"{llm}/layers"
        lora = cfg.lora is not None
        for name in ("q_einsum", "kv_einsum", "attn_vec_einsum"):
            p = f"{lay}/attn/{name}{sfx}"
            pairs += _einsum(
                f"{p}/w", lambda m, i=i, n=name: getattr(m.llm.layers[i].attn, n), (f"{p}/lora_a", f"{p}/lora_b") if lora else None
            )
        for name in ("gating_einsum", "linear"):
            p = f"{lay}/mlp{sfx}/{name}"
            pairs += _einsum(
                p, lambda m, i=i, n=name: getattr(m.llm.layers[i].mlp, n), (f"{p}_lora_a", f"{p}_lora_b") if lora else None
            )
        for name in ("pre_attention_norm", "pre_ffw_norm"):
            if i == 0:
                pairs.append((f"{lay}/{name}/scale", lambda m, n=name: getattr(m.llm.layers[0], n).scale))
            else:
                pairs += _dense(f"{lay}/{name}_1/Dense_0", lambda m, n=name: getattr(m.llm.layers[1], n).modulation)
    pairs.append((f"{llm}/final_norm/scale", lambda m: m.llm.final_norm.scale))
    pairs += _dense(f"{llm}/final_norm_1/Dense_0", lambda m: m.llm.final_norm_1.modulation)
    for name in ("action_in_proj", "time_mlp_in", "time_mlp_out", "action_out_proj"):
        pairs += _dense(name, lambda m, n=name: getattr(m, n))
    return pairs


def abstract_model(config: Pi05Config) -> Pi05:
    """The model with ShapeDtypeStruct leaves: no memory allocated, whatever the size."""
    return eqx.filter_eval_shape(Pi05, config, key=jax.random.key(0))


def to_openpi(model: Pi05) -> dict[str, object]:
    """Flat {openpi path: array} of our model (works on abstract models too)."""
    return {path: get(model) for path, get in leaf_map(model.config)}


def from_openpi(
    flat: Mapping[str, object], config: Pi05Config, *, lora_seed: int | None = None, dtype=np.float32
) -> Pi05:
    """Build our model from a flat openpi param dict. Shape mismatch or missing/extra leaf → ValueError
    naming the path and both shapes. `lora_seed`: initialise LoRA adapters the checkpoint lacks
    (fine-tuning a base checkpoint with LoRA, as openpi's weight loader does): `lora_a` ~ N(0, 0.01),
    `lora_b` = 0, so the adapted model starts equal to the checkpoint."""
    rng = None if lora_seed is None else np.random.default_rng(lora_seed)
    template = abstract_model(config)
    pairs = leaf_map(config)
    expected = {path for path, _ in pairs}
    extra = sorted(set(flat) - expected)
    errors = [f"checkpoint param {p}: not in the model (shape {tuple(np.shape(flat[p]))})" for p in extra]
    values = []
    for path, get in pairs:
        want = tuple(get(template).shape)
        if path not in flat:
            name = path.rsplit("/", 1)[-1]
            if rng is not None and "lora" in name:
                a = name.endswith("lora_a")
                values.append(jax.numpy.asarray(rng.normal(0, 0.01, want) if a else np.zeros(want), dtype=dtype))
                continue
            errors.append(f"checkpoint param {path}: missing (expected {want})")
            continue
        got = tuple(np.shape(flat[path]))
        if got != want:
            errors.append(f"checkpoint param {path}: expected {want}, got {got}")
            continue
        values.append(jax.numpy.asarray(flat[path], dtype=dtype))
    if errors:
        raise ValueError(f"{len(errors)} param problem(s):\n  " + "\n  ".join(errors))
    return eqx.tree_at(lambda m: [get(m) for _, get in pairs], template, values)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        out.update(_flatten(v, path) if isinstance(v, Mapping) else {path: v})
    return out


def _unflatten(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat {openpi path: numpy array} from an openpi params checkpoint directory (released or trainer
    layout; a trailing `value` on every path is dropped, as openpi's `restore_params` does). A URL
    (gs://openpi-assets/checkpoints/pi05_base/params) goes to orbax as it is: orbax reads it."""
    import orbax.checkpoint as ocp
    from etils import epath

    path = epath.Path(path) if "://" in str(path) else epath.Path(os.path.abspath(path))
    if not path.is_dir():
        raise FileNotFoundError(f"openpi params checkpoint {path}: no such directory")
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        meta_tree = getattr(meta, "item_metadata", meta)
        meta_tree = getattr(meta_tree, "tree", meta_tree)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta_tree)
        tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    if "params" not in tree:
        raise ValueError(f"openpi params checkpoint {path}: no top-level 'params' item (found {sorted(tree)})")
    flat = _flatten(tree["params"])
    if flat and all(p.endswith("/value") for p in flat):
        flat = {p[: -len("/value")]: v for p, v in flat.items()}
    return {p: np.asarray(v) for p, v in flat.items()}


def load_checkpoint(path: str | os.PathLike, config: Pi05Config, **kw) -> Pi05:
    return from_openpi(read_checkpoint(path), config, **kw)


def save_checkpoint(model: Pi05, path: str | os.PathLike) -> None:
    """Write our params in openpi's released layout: orbax PyTree `{'params': nested dict}`."""
    import orbax.checkpoint as ocp

    tree = {"params": _unflatten({p: np.asarray(v) for p, v in to_openpi(model).items()})}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(path), tree)


def check_shapes(listing: Mapping, config: Pi05Config) -> list[str]:
    """Compare our abstract model with an openpi listing {path: {shape, dtype}}; returns the differences."""
    ours = {p: tuple(v.shape) for p, v in to_openpi(abstract_model(config)).items()}
    theirs = {p: tuple(v["shape"]) for p, v in listing.items()}
    diffs = [f"{p}: ours {ours.get(p, 'missing')}, reference {theirs.get(p, 'missing')}" for p in sorted(set(ours) | set(theirs)) if ours.get(p) != theirs.get(p)]
    return diffs


@dataclasses.dataclass
class Args:
    check_shapes: str
    """An openpi param listing (JSON, `params: {path: {shape, dtype}}`) to compare the full-size model with."""
    action_horizon: int = 50


def main(args: Args) -> int:
    listing = json.load(open(args.check_shapes))
    params = listing.get("params", listing)
    config = pi05_full(action_horizon=args.action_horizon)
    diffs = check_shapes(params, config)
    n_ref = len(params)
    total = sum(int(np.prod(s)) for s in (tuple(v.shape) for v in to_openpi(abstract_model(config)).values()))
    for d in diffs:
        print("MISMATCH", d)
    print(f"{n_ref - len([d for d in diffs])}/{n_ref} leaves match; our model: {total:,} parameters")
    if "total_params" in listing:
        print(f"reference total: {listing['total_params']:,} parameters")
        if listing["total_params"] != total:
            return 1
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
